//! The `cryptvm` command: `run`, `img` and `ctl`.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
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
       cryptvm img  create|info|convert|compare ...  qemu-img compatible image tool
       cryptvm ctl  --socket PATH [COMMAND [ARGS]]   QMP client (cryptvm or QEMU)";
