//! How fast guest code runs on this host's KVM, for tests that must decide whether a Linux
//! guest can boot here in useful time (environment.md: a nested, software KVM runs guest
//! kernel code ~1000x slower than hardware virtualisation).

use std::io::Write;
use std::time::Instant;

use vm_memory::{Bytes, GuestAddress};

use crate::arch::x86_64::layout;
use crate::vstate::vcpu::EntryPoint;
use crate::vstate::vm::{ExitReason, Vm, VmError, VmParams};

/// Loop iterations of the calibration guest (two instructions each).
const LOOP_ITERATIONS: u32 = 250_000;

/// 64-bit code: `mov ecx, N; 1: dec ecx; jnz 1b; mov al, 0xfe; out 0x64, al; hlt; jmp .-1`.
fn loop_guest(iterations: u32) -> Vec<u8> {
    let mut code = vec![0xb9];
    code.extend(iterations.to_le_bytes());
    code.extend([
        0xff, 0xc9, 0x75, 0xfc, 0xb0, 0xfe, 0xe6, 0x64, 0xf4, 0xeb, 0xfd,
    ]);
    code
}

/// Guest instructions per second on this host's KVM, measured by running a tiny long-mode
/// guest through a loop of 500k instructions (VM creation not counted; vCPU set-up is).
/// Hardware KVM gives well over 10^8; the software KVM of the CI machines about 2x10^6.
pub fn kvm_speed() -> Result<f64, VmError> {
    let vm = Vm::new(VmParams {
        cpus: 1,
        memory: 16 << 20,
        serial_out: Box::new(std::io::sink()) as Box<dyn Write + Send>,
        serial_input: false,
    })?;
    vm.memory()
        .write_slice(
            &loop_guest(LOOP_ITERATIONS),
            GuestAddress(layout::HIGH_RAM_START),
        )
        .map_err(|e| VmError::Other(format!("writing the calibration guest: {e}")))?;
    let start = Instant::now();
    let reason = vm.run(EntryPoint::Linux64 {
        entry: layout::HIGH_RAM_START,
        boot_params: layout::ZERO_PAGE_START,
    })?;
    let elapsed = start.elapsed().as_secs_f64().max(1e-6);
    if reason != ExitReason::Reset {
        return Err(VmError::Other(format!(
            "calibration guest ended with {reason:?}, not a reset"
        )));
    }
    Ok(2.0 * f64::from(LOOP_ITERATIONS) / elapsed)
}
