//! The `cryptvm` command: `run`, `img` and `ctl`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let mut all = std::env::args();
    let invoked_as = all.next().unwrap_or_default();
    let args: Vec<String> = all.collect();
    // Through a symlink named `qemu-img`, cryptvm is `cryptvm img` with qemu-img's
    // message prefix, so that scripts written for qemu-img run unchanged.
    if std::path::Path::new(&invoked_as).file_name() == Some("qemu-img".as_ref()) {
        return ExitCode::from(img::main_as("qemu-img", &invoked_as, &args));
    }
    let code = match args.first().map(String::as_str) {
        Some("img") => img::main(&args[1..]),
        Some("run") => vmm::cli::run::main(&args[1..]),
        Some("ctl") => vmm::cli::ctl::main(&args[1..]),
        Some("--version") | Some("-V") => {
            println!("cryptvm {}", env!("CARGO_PKG_VERSION"));
            0
        }
        Some("--help") | Some("-h") | None => {
            println!("{}", USAGE);
            0
        }
        Some(other) => {
            eprintln!("cryptvm: unknown command '{other}' (expected run, img or ctl)");
            1
        }
    };
    ExitCode::from(code)
}

const USAGE: &str = "usage: cryptvm run  [--config vm.json] [options]   boot a guest
       cryptvm img  create|info|convert|check|map|resize ...  qemu-img compatible image tool
                                               (also run as `qemu-img` through a symlink)
       cryptvm ctl  --socket PATH [COMMAND [ARGS]]   QMP client (cryptvm or QEMU)";
