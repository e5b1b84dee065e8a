//! `cryptvm img`: a qemu-img compatible image tool for luks and raw images.

mod amend;
mod args;
mod bench;
mod cache;
mod check;
mod commit;
mod compare;
mod convert;
mod copy;
mod create;
mod dd;
mod image;
mod info;
mod map;
mod measure;
mod options_help;
mod qjson;
mod qopts;
mod rebase;
mod resize;
mod size;
mod snapshot;
mod sparse;
mod writeback;

use block::BlockError;

pub use args::{ArgError, Args};

/// What can make an `img` sub-command fail.
#[derive(Debug, thiserror::Error)]
pub enum ImgError {
    /// Bad command line.
    #[error(transparent)]
    Args(#[from] ArgError),
    /// The block layer refused.
    #[error(transparent)]
    Block(#[from] BlockError),
    /// A request of `img convert` failed.
    #[error("error while {what} at byte {offset}: {source}")]
    Copy {
        /// `reading` or `writing`.
        what: &'static str,
        /// Where the request started.
        offset: u64,
        /// Why.
        #[source]
        source: BlockError,
    },
    /// The flush at the end of `img convert` failed: the copy is not durable.
    #[error("error while flushing the target: {source}")]
    Flush {
        /// Why.
        #[source]
        source: BlockError,
    },
    /// An image named on the command line could not be opened (qemu-img's wording).
    #[error("Could not open '{name}': {source}")]
    Open {
        /// The name as given (a file name, `json:...` or `--image-opts` options).
        name: String,
        /// Why.
        #[source]
        source: Box<ImgError>,
    },
    /// Anything else, already worded for the user.
    #[error("{0}")]
    Msg(String),
}

impl ImgError {
    /// This error as qemu-img reports a failed open of the image named `name`.
    pub(crate) fn opening(self, name: &str) -> Self {
        ImgError::Open {
            name: name.to_string(),
            source: Box::new(self),
        }
    }
}

impl From<block::luks::LuksError> for ImgError {
    fn from(e: block::luks::LuksError) -> Self {
        Self::Block(e.into())
    }
}

/// Result of `img` sub-commands: the exit status on success.
pub type Result<T, E = ImgError> = std::result::Result<T, E>;

/// `cryptvm img --help`.
const USAGE: &str = "PROGRAM: a qemu-img compatible image tool (luks, qcow2, raw).  Usage:

  PROGRAM COMMAND [command options]

Commands (options as qemu-img's):
  amend [--object objectdef] [--image-opts] [-p] [-q] [-f fmt] [-t cache] [--force] -o options filename
  bench [-c count] [-d depth] [-f fmt] [--flush-interval=N] [-n] [-o offset] [-q] [-s size] [-S step] [-t cache] [-w] [-U] filename
  check [--object objectdef] [--image-opts] [-q] [-f fmt] [--output=ofmt] [-r [leaks | all]] [-T src_cache] [-U] filename
  commit [--object objectdef] [--image-opts] [-q] [-f fmt] [-t cache] [-b base] [-r rate_limit] [-d] [-p] filename
  compare [--object objectdef] [--image-opts] [-f fmt] [-F fmt] [-T src_cache] [-p] [-q] [-s] [-U] filename1 filename2
  convert [--object objectdef] [--image-opts] [--target-image-opts] [-U] [-C] [-c] [-p] [-q] [-n] [-f fmt] [-t cache] [-T src_cache] [-B backing_file [-F backing_fmt]] [-O output_fmt] [-o options] [-S sparse_size] [-m num_coroutines] [-W] filename [filename2 [...]] output_filename
  dd [--image-opts] [-U] [-f fmt] [-O output_fmt] [bs=block_size] [count=blocks] [skip=blocks] if=input of=output
  create [--object objectdef] [-q] [-f fmt] [-b backing_file [-F backing_fmt]] [-u] [-o options] filename [size]
  info [--object objectdef] [--image-opts] [-f fmt] [--output=ofmt] [--backing-chain] [-U] filename
  measure [--output=ofmt] [-O output_fmt] [-o options] [--size N | [--object objectdef] [--image-opts] [-f fmt] [-l snapshot_param] filename]
  map [--object objectdef] [--image-opts] [-f fmt] [--start-offset=offset] [--max-length=len] [--output=ofmt] [-U] filename
  rebase [--object objectdef] [--image-opts] [-U] [-q] [-f fmt] [-t cache] [-T src_cache] [-p] [-u] [-c] -b backing_file [-F backing_fmt] filename
  resize [--object objectdef] [--image-opts] [-f fmt] [--preallocation=prealloc] [-q] [--shrink] [-U] filename [+ | -]size
  snapshot [--object objectdef] [--image-opts] [-U] [-q] [-l | -a snapshot | -c snapshot | -d snapshot] filename
";

/// The name messages start with: `cryptvm img`, or `qemu-img` when the binary runs
/// under that name ([`main_as`]).
static PROGRAM: std::sync::OnceLock<&'static str> = std::sync::OnceLock::new();

/// The name this tool's messages start with.
pub(crate) fn program() -> &'static str {
    PROGRAM.get().copied().unwrap_or("cryptvm img")
}

/// Prints one error line as qemu-img does: `PROGRAM: message`.
pub(crate) fn error_line(message: impl std::fmt::Display) {
    eprintln!("{}: {message}", program());
}

/// How the tool was invoked, for "Try '... --help'" hints (qemu-img repeats its
/// `argv[0]` there).
static INVOKED: std::sync::OnceLock<String> = std::sync::OnceLock::new();

/// The command the "Try '... --help'" hints name.
pub(crate) fn invoked() -> &'static str {
    INVOKED.get().map_or("cryptvm img", String::as_str)
}

/// Runs `ARGS...` as the tool named `program`, invoked as `argv0` (`qemu-img` for a
/// binary run through a symlink of that name, so that scripts written for qemu-img
/// run unchanged).
pub fn main_as(program: &'static str, argv0: &str, argv: &[String]) -> u8 {
    let _ = PROGRAM.set(program);
    let _ = INVOKED.set(argv0.to_string());
    main(argv)
}

/// Runs `cryptvm img ARGS...` and returns the process exit status.
pub fn main(argv: &[String]) -> u8 {
    // As qemu-img (a C program): writing to a closed pipe (`| head`) ends the process
    // by SIGPIPE. Rust's runtime ignores the signal, which made progress output panic.
    // SAFETY: restores the default disposition of one signal; no handler runs.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    let Some((cmd, rest)) = argv.split_first() else {
        error_line("Not enough arguments");
        eprintln!("Try '{} --help' for more info", invoked());
        return 1;
    };
    let result = match cmd.as_str() {
        "--help" | "-h" => {
            print!("{}", USAGE.replace("PROGRAM", program()));
            return 0;
        }
        "create" => create::run(rest),
        "info" => info::run(rest),
        "convert" => convert::run(rest),
        "compare" => compare::run(rest),
        "bench" => bench::run(rest),
        "check" => check::run(rest),
        "map" => map::run(rest),
        "resize" => resize::run(rest),
        "measure" => measure::run(rest),
        "amend" => amend::run(rest),
        "dd" => dd::run(rest),
        "snapshot" => snapshot::run(rest),
        "rebase" => rebase::run(rest),
        "commit" => commit::run(rest),
        other => Err(ImgError::Msg(format!("Command not found: {other}"))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line, always: callers parse stderr.
            error_line(e.to_string().replace('\n', " "));
            // qemu-img compare reserves 1 for "images differ".
            if cmd == "compare" {
                2
            } else {
                1
            }
        }
    }
}
