//! Ending the VM (as PID 1) or the agent process (otherwise).

use crate::Context;

#[derive(Clone, Copy)]
pub enum Action {
    PowerOff,
    Reboot,
}

/// Writes one line to the console (standard error, which the kernel opened on /dev/console).
pub fn console(line: &str) {
    let text = format!("supermachine-agent: {line}\n");
    let _ = crate::sys::write_all(2, text.as_bytes());
}

/// Stops the machine. Without ACPI the kernel has no way to power off and would halt the CPU
/// forever, so power-off falls back to a reset: supermachine's VMM (and QEMU with `-no-reboot`)
/// treats the reset of a kernel booted with `reboot=k` as the end of the VM.
fn stop_machine(action: Action) -> ! {
    // SAFETY: sync, reboot and pause take only integers (or nothing) and have no memory-safety
    // preconditions; reboot either ends the machine or fails with an errno.
    unsafe {
        libc::sync();
        if matches!(action, Action::PowerOff) && std::path::Path::new("/sys/firmware/acpi").exists()
        {
            libc::reboot(libc::RB_POWER_OFF);
        }
        libc::reboot(libc::RB_AUTOBOOT);
        loop {
            libc::pause();
        }
    }
}

/// The `shutdown` request.
pub fn shutdown(action: Action, ctx: &Context) -> ! {
    if ctx.pid1 {
        stop_machine(action);
    }
    ctx.cleanup();
    std::process::exit(0);
}

/// Reports an error that leaves the agent unable to serve, then stops (never hangs silently).
pub fn fatal(message: &str, pid1: bool) -> ! {
    console(&format!("fatal: {message}"));
    if pid1 {
        stop_machine(Action::PowerOff);
    }
    std::process::exit(1);
}
