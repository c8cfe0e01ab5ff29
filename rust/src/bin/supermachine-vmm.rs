//! `supermachine-vmm`: the VMM worker process, one per VM. Started by supermachine itself (see
//! `supermachine_core::worker::spawn`), never by hand: it speaks the control protocol on its
//! standard input.

fn main() {
    if std::env::args().nth(1).as_deref() != Some("--worker") {
        eprintln!(
            "supermachine-vmm is started by supermachine for each VM; it is not a command to run \
             by hand"
        );
        std::process::exit(2);
    }
    std::process::exit(supermachine_core::worker::server::main());
}
