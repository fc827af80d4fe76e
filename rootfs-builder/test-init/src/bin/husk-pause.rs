//! A static pause program for test images built `FROM scratch`: sleeps until SIGINT or SIGTERM
//! (as Kubernetes' pause does), or with `euid` prints its effective UID (copied setuid-root into
//! an image, it shows whether a setuid binary elevated).

extern "C" fn on_signal(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(0) }
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("euid") {
        // SAFETY: geteuid has no preconditions.
        println!("euid={}", unsafe { libc::geteuid() });
        return;
    }
    // SAFETY: installs a handler that only calls _exit.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}
