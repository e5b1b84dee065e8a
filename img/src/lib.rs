//! `cryptvm img`: a qemu-img compatible image tool for luks and raw images.

mod args;
mod bench;
mod cache;
mod check;
mod compare;
mod convert;
mod copy;
mod create;
mod image;
mod info;
mod size;
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
    /// Anything else, already worded for the user.
    #[error("{0}")]
    Msg(String),
}

impl From<block::luks::LuksError> for ImgError {
    fn from(e: block::luks::LuksError) -> Self {
        Self::Block(e.into())
    }
}

/// Result of `img` sub-commands: the exit status on success.
pub type Result<T, E = ImgError> = std::result::Result<T, E>;

/// Runs `cryptvm img ARGS...` and returns the process exit status.
pub fn main(argv: &[String]) -> u8 {
    let Some((cmd, rest)) = argv.split_first() else {
        eprintln!("cryptvm img: missing command (create, info, convert, compare)");
        return 1;
    };
    let result = match cmd.as_str() {
        "create" => create::run(rest),
        "info" => info::run(rest),
        "convert" => convert::run(rest),
        "compare" => compare::run(rest),
        "bench" => bench::run(rest),
        "check" => check::run(rest),
        other => Err(ImgError::Msg(format!("Command not found: {other}"))),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            // One line, always: callers parse stderr.
            eprintln!("cryptvm img: {}", e.to_string().replace('\n', " "));
            // qemu-img compare reserves 1 for "images differ".
            if cmd == "compare" {
                2
            } else {
                1
            }
        }
    }
}
