//! `cryptvm img dd`: copies an image into a new one, block by block, as
//! `qemu-img dd` (`img_dd` of qemu-img.c) does: `bs=`, `count=`, `skip=`,
//! `if=`, `of=`; the output is created in the `-O` format (raw by default)
//! with the input's size less what is skipped, prints nothing on success.

use std::fs::OpenOptions;
use std::path::Path;

use block::qcow2;

use super::image::{image_options, load_objects, open, strerror, OpenMode};
use super::measure::{Line, Lines};
use super::size::{strtosz, SizeError};
use super::{Args, ImgError, Result};

/// The operands given.
#[derive(Debug, Default)]
struct Operands {
    bs: Option<u64>,
    count: Option<u64>,
    skip: Option<u64>,
    input: Option<String>,
    output: Option<String>,
}

/// Runs `img dd`.
pub fn run(argv: &[String]) -> Result<u8> {
    Ok(match dd(argv) {
        Ok(()) => 0,
        Err(lines) => lines.print(),
    })
}

/// qemu-img's `cvtnum_full`.
pub(crate) fn cvtnum(name: &str, value: &str, min: u64, max: u64) -> Result<u64, Lines> {
    // qemu_strtosz refuses a negative number as out of range.
    let negative = value.trim_start().starts_with('-');
    match strtosz(value) {
        _ if negative => {
            Err(format!("Invalid {name} specified. Must be between {min} and {max}.").into())
        }
        Ok(v) if (min..=max).contains(&v) => Ok(v),
        Err(SizeError::Invalid) => Err(format!("Invalid {name} specified: '{value}'.").into()),
        _ => Err(format!("Invalid {name} specified. Must be between {min} and {max}.").into()),
    }
}

fn operands(args: &[String]) -> Result<Operands, Lines> {
    let mut o = Operands::default();
    let max = i64::MAX as u64;
    for arg in args {
        let Some((key, value)) = arg.split_once('=') else {
            return Err(format!("unrecognized operand {arg}").into());
        };
        match key {
            "bs" => o.bs = Some(cvtnum("bs", value, 1, i32::MAX as u64)?),
            "count" => o.count = Some(cvtnum("count", value, 0, max)?),
            "skip" => o.skip = Some(cvtnum("skip", value, 0, max)?),
            "if" => o.input = Some(value.to_string()),
            "of" => o.output = Some(value.to_string()),
            _ => return Err(format!("unrecognized operand {key}").into()),
        }
    }
    Ok(o)
}

fn dd(argv: &[String]) -> Result<(), Lines> {
    let a = Args::parse(argv, "U", "fO")?;
    let secrets = load_objects(&a.objects)?;
    let ops = operands(&a.positional)?;
    let (Some(input), Some(output)) = (&ops.input, &ops.output) else {
        return Err("Must specify both input and output files".into());
    };
    let bs = ops.bs.unwrap_or(512);
    let src = open(
        image_options(input, a.image_opts, a.format.as_deref())?,
        &secrets,
        OpenMode {
            read_only: true,
            no_io: false,
            cache: None,
        },
    )
    .map_err(|e| super::measure::opening(e, input))?
    .node;
    let out_fmt = a.output_format.clone().unwrap_or_else(|| "raw".into());
    if !matches!(out_fmt.as_str(), "raw" | "qcow2" | "luks") {
        return Err("Unknown file format".into());
    }
    let mut size = src.size();
    if let Some(count) = ops.count {
        if count <= i64::MAX as u64 / bs && count * bs < size {
            size = count * bs;
        }
    }
    let skip = ops.skip.unwrap_or(0);
    let beyond = ops.skip.is_some() && (skip > i64::MAX as u64 / bs || size < bs * skip);
    let out_size = if beyond { 0 } else { size - bs * skip };
    let creating = |msg: String| -> Lines {
        format!("{output}: error while creating output image: {msg}").into()
    };
    let path = Path::new(output);
    match out_fmt.as_str() {
        // The luks driver needs key-secret, which dd cannot pass (no -o).
        "luks" => {
            return Err(creating(
                "Parameter 'key-secret' is required for cipher".into(),
            ))
        }
        _ => {
            let f = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(path)
                .map_err(|e| creating(format!("Could not create '{output}': {}", strerror(&e))))?;
            if out_fmt == "raw" {
                f.set_len(out_size.next_multiple_of(block::SECTOR_SIZE))
                    .map_err(|e| creating(format!("Could not resize file: {}", strerror(&e))))?;
            } else {
                drop(f);
                qcow2::create(path, Some(out_size), &qcow2::CreateOptions::default())
                    .map_err(|e| creating(e.to_string()))?;
            }
        }
    }
    let dst = open(
        image_options(output, false, Some(&out_fmt))?,
        &secrets,
        OpenMode {
            read_only: false,
            no_io: false,
            cache: None,
        },
    )
    .map_err(|e| Lines::from(e.opening(output)))?
    .node;
    let mut in_pos = if beyond {
        // As dd(1): a warning and an empty output.
        Lines(vec![Line::Error(format!(
            "{input}: cannot skip to specified offset"
        ))])
        .print();
        size
    } else {
        skip * bs
    };
    let mut buf = vec![0u8; bs.min(size.saturating_sub(in_pos)).max(1) as usize];
    let mut out_pos = 0u64;
    while in_pos < size {
        let n = bs.min(size - in_pos) as usize;
        let chunk = &mut buf[..n];
        src.read_at(in_pos, chunk).map_err(|e| {
            Lines::from(format!(
                "error while reading from input image file: {}",
                io_text(&e)
            ))
        })?;
        in_pos += n as u64;
        dst.write_at(out_pos, chunk).map_err(|e| {
            Lines::from(format!(
                "error while writing to output image file: {}",
                io_text(&e)
            ))
        })?;
        out_pos += n as u64;
    }
    dst.flush().map_err(ImgError::from)?;
    Ok(())
}

/// A block error's cause in strerror's words.
fn io_text(e: &block::BlockError) -> String {
    let t = e.to_string();
    match t.rfind(" (os error ") {
        Some(at) => t[..at].to_string(),
        None => t,
    }
}
