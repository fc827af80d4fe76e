#!/usr/bin/env bash
# The main job: boot husk's guest kernel in a husk-vmm microVM and run a workload in it (for
# now the static test init, which reports what the guest sees and powers off). On a host with
# hardware KVM it runs directly; here it runs inside the nested test host.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
./tests/build-artifacts.sh
t=target/husk
exec cargo run --release -q -p husk-tests --example testhost-run -- --timeout 600 \
    "time $PWD/target/release/husk-vmm --kernel $PWD/$t/vmlinux --initramfs $PWD/$t/test-init.cpio --vcpus 2 \
     --cmdline 'console=ttyS0 reboot=k panic=-1 pci=off quiet husk.test=poweroff'; echo husk-vmm exit status \$?" \
    "$PWD/target/release/husk-vmm" "$PWD/$t/vmlinux" "$PWD/$t/test-init.cpio"
