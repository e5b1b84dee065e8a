//! `cryptvm img resize`: changes an image's virtual size as `qemu-img resize`
//! does (absolute or `+`/`-` relative sizes, `--shrink`, `--preallocation`),
//! with its messages and exit status.

use block::{BlockError, NodeRef, Prealloc};

use super::image::{image_options, load_objects, open, OpenMode};
use super::size::{strtosz, SizeError};
use super::{Args, ImgError, Result};

/// qemu-img's warning before refusing a shrink without `--shrink`.
const SHRINK_WARNING: &str = "warning: Shrinking an image will delete all data beyond the \
shrunken image's end. Before performing such an operation, make sure there is no important \
data there.";

/// qemu-img's warning when a raw image's format was probed for writing.
pub(crate) fn probed_raw_warning(name: &str) -> String {
    format!(
        "WARNING: Image format was not specified for '{name}' and probing guessed raw.\n         \
Automatically detecting the format is dangerous for raw images, write operations on block 0 \
will be restricted.\n         Specify the 'raw' format explicitly to remove the restrictions."
    )
}

/// How the size argument relates to the current size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Relative {
    /// `SIZE`: the new size.
    Absolute,
    /// `+SIZE`: added.
    Grow,
    /// `-SIZE`: taken away.
    Shrink,
}

/// Runs `img resize [options] FILENAME [+|-]SIZE`; 0 on success, 1 otherwise.
pub fn run(argv: &[String]) -> Result<u8> {
    // As qemu-img: the size is the last argument, taken before the options
    // are parsed, so that `-1G` is not read as options.
    let Some((size_arg, rest)) = argv.split_last() else {
        return Ok(usage_error("Expecting image file name and size"));
    };
    let a = Args::parse(rest, "qU", "f")?;
    let prealloc = match a.extra.iter().rev().find(|(k, _)| k == "preallocation") {
        None => Prealloc::Off,
        Some((_, v)) => match Prealloc::parse(v) {
            Some(p) => p,
            None => return Err(ImgError::Msg(format!("Invalid preallocation mode '{v}'"))),
        },
    };
    let spec = match a.positional.as_slice() {
        [spec] => spec,
        [] => return Ok(usage_error("Expecting image file name and size")),
        _ => return Ok(usage_error("Extra argument(s) in command line")),
    };
    let (relative, amount) = match parse_size_arg(size_arg) {
        Ok(v) => v,
        Err(lines) => {
            super::error_line(format_args!("{lines}"));
            return Ok(1);
        }
    };
    let secrets = load_objects(&a.objects)?;
    let probed = a.format.is_none() && !a.image_opts && !spec.starts_with("json:");
    let opts = image_options(spec, a.image_opts, a.format.as_deref())?;
    let image = open(
        opts,
        &secrets,
        OpenMode {
            read_only: false,
            no_io: false,
            cache: None,
        },
    )
    .map_err(|e| e.opening(spec))?;
    if probed && image.node.driver() == "raw" {
        eprintln!("{}", probed_raw_warning(spec));
    }
    resize(&image.node, relative, amount, prealloc, a.shrink, a.quiet)
}

/// The checks of qemu-img on the new size, then the resize itself.
fn resize(
    node: &NodeRef,
    relative: Relative,
    amount: u64,
    prealloc: Prealloc,
    shrink: bool,
    quiet: bool,
) -> Result<u8> {
    let current = node.size() as i64;
    let total = new_size(current, relative, amount);
    if total <= 0 {
        return Err(ImgError::Msg("New image size must be positive".into()));
    }
    if total <= current && prealloc != Prealloc::Off {
        return Err(ImgError::Msg(
            "Preallocation can only be used for growing images".into(),
        ));
    }
    if total < current && !shrink {
        super::error_line("Use the --shrink option to perform a shrink operation.");
        super::error_line(format_args!("{SHRINK_WARNING}"));
        return Ok(1);
    }
    node.truncate(total as u64, prealloc)
        .and_then(|()| node.flush())
        .map_err(qemu_wording)?;
    if !quiet {
        println!("Image resized.");
    }
    Ok(0)
}

/// qemu-img's arithmetic on 64-bit signed sizes (wrapping, as in C).
fn new_size(current: i64, relative: Relative, amount: u64) -> i64 {
    let n = amount as i64;
    match relative {
        Relative::Absolute => n,
        Relative::Grow => current.wrapping_add(n),
        Relative::Shrink => current.wrapping_sub(n),
    }
}

/// Splits `[+|-]SIZE` and parses the size; on error, qemu-img's message.
fn parse_size_arg(arg: &str) -> std::result::Result<(Relative, u64), String> {
    let (relative, text) = match arg.as_bytes().first() {
        Some(b'+') => (Relative::Grow, &arg[1..]),
        Some(b'-') => (Relative::Shrink, &arg[1..]),
        _ => (Relative::Absolute, arg),
    };
    match strtosz(text) {
        Ok(n) => Ok((relative, n)),
        Err(SizeError::Range) => Err(format!(
            "Value '{text}' is out of range for parameter 'size'"
        )),
        Err(SizeError::Invalid) => Err(
            "Parameter 'size' expects a non-negative number below 2^64\n\
             Optional suffix k, M, G, T, P or E means kilo-, mega-, giga-, tera-, peta-\n\
             and exabytes, respectively."
                .into(),
        ),
    }
}

/// A failed resize of the host file, as QEMU's file driver words it.
fn qemu_wording(e: BlockError) -> ImgError {
    match e {
        BlockError::Io { source, .. } => ImgError::Msg(format!(
            "Could not resize file: {}",
            super::image::strerror(&source)
        )),
        other => other.into(),
    }
}

/// Prints a command-line error as qemu-img does (two lines); exit status 1.
fn usage_error(msg: &str) -> u8 {
    super::error_line(format_args!("{msg}"));
    eprintln!("Try '{} resize --help' for more info", super::invoked());
    1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_signs() {
        assert_eq!(parse_size_arg("+1G"), Ok((Relative::Grow, 1 << 30)));
        assert_eq!(parse_size_arg("-512"), Ok((Relative::Shrink, 512)));
        assert_eq!(parse_size_arg("2M"), Ok((Relative::Absolute, 2 << 20)));
        assert!(parse_size_arg("+").is_err());
        assert!(parse_size_arg("20E").unwrap_err().contains("out of range"));
        // C's wrapping: 9 EiB is negative, "-15E" grows.
        assert!(new_size(1 << 30, Relative::Absolute, 9 << 60) < 0);
        assert_eq!(
            new_size(1 << 30, Relative::Shrink, 15 << 60),
            (1 << 30) + (1 << 60)
        );
        assert_eq!(new_size(1024, Relative::Grow, 24), 1048);
    }
}
