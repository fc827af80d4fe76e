//! husk-agent: the guest's PID 1. Its container manager arrives with the agent issue.

fn main() {
    eprintln!("husk-agent: not implemented yet");
    std::process::exit(1);
}
