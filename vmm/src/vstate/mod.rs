//! KVM state: the VM (memory slots, irqchip, PIT, eventfds) and its vCPU threads.

pub mod vcpu;
pub mod vm;

pub use vcpu::{StartGate, Vcpu, VcpuError, VcpuHandle};
pub use vm::{Vm, VmError};
