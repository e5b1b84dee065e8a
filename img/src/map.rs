//! `cryptvm img map`: where an image's bytes live, as `qemu-img map` prints
//! it (`img_map`, `get_block_status` and `dump_map_entry` in qemu-img.c).

use std::io::Write;

use block::{BlockError, BlockStatus, NodeRef};

use super::image::{image_options, load_objects, open, OpenMode};
use super::{Args, ImgError, Result};

/// Largest offset or length qemu-img takes (`INT64_MAX`).
const MAX_ARG: u64 = i64::MAX as u64;

/// One run of the map (qemu-img's `MapEntry`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct MapEntry {
    start: u64,
    length: u64,
    /// How far down the backing chain the bytes are defined.
    depth: u64,
    /// Defined by some layer of the chain (`BDRV_BLOCK_ALLOCATED`).
    present: bool,
    zero: bool,
    data: bool,
    compressed: bool,
    /// Host offset, when known.
    offset: Option<u64>,
    /// The host file holding the bytes, with the offset.
    filename: Option<String>,
}

impl MapEntry {
    /// qemu-img's `entry_mergeable`: `next` continues `self` in every respect.
    fn mergeable(&self, next: &MapEntry) -> bool {
        if self.length == 0 {
            return false;
        }
        let same = self.zero == next.zero
            && self.data == next.data
            && self.compressed == next.compressed
            && self.depth == next.depth
            && self.present == next.present
            && self.filename == next.filename
            && self.offset.is_some() == next.offset.is_some();
        same && self
            .offset
            .zip(next.offset)
            .is_none_or(|(a, b)| a + self.length == b)
    }
}

/// Runs `img map`.
pub fn run(argv: &[String]) -> Result<u8> {
    let a = Args::parse(argv, "U", "fsl")?;
    let (start, max_length) = range_args(&a)?;
    let [spec] = a.positional.as_slice() else {
        return Err(ImgError::Msg("Expecting one image file name".into()));
    };
    let secrets = load_objects(&a.objects)?;
    let opts = image_options(spec, a.image_opts, a.format.as_deref())?;
    let mode = OpenMode {
        read_only: true,
        no_io: false,
        cache: None,
    };
    let image = open(opts, &secrets, mode).map_err(|e| e.opening(spec))?;
    let size = image.node.size();
    let end = match max_length {
        Some(l) => start.saturating_add(l).min(size),
        None => size,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let result = dump_map(&mut out, &image.node, start, end, a.json);
    let flushed = out.flush();
    result?;
    flushed.map_err(write_error)?;
    Ok(0)
}

/// `--start-offset`/`-s` and `--max-length`/`-l`, checked as qemu-img's `cvtnum`.
fn range_args(a: &Args) -> Result<(u64, Option<u64>)> {
    let mut start = 0;
    let mut max_length = None;
    let long = a.extra.iter().map(|(k, v)| (k.as_str(), v));
    let short = a.short.iter().map(|(c, v)| match c {
        's' => ("start-offset", v),
        _ => ("max-length", v),
    });
    for (name, value) in short.chain(long) {
        match name {
            "start-offset" => start = cvtnum("start offset", value)?,
            "max-length" => max_length = Some(cvtnum("max length", value)?),
            _ => {}
        }
    }
    Ok((start, max_length))
}

/// Prints the map of `[start, end)` of `node` in text or JSON.
fn dump_map(out: &mut impl Write, node: &NodeRef, start: u64, end: u64, json: bool) -> Result<()> {
    if json {
        out.write_all(b"[").map_err(write_error)?;
    } else {
        writeln!(
            out,
            "{:<16}{:<16}{:<16}File",
            "Offset", "Length", "Mapped to"
        )
        .map_err(write_error)?;
    }
    let mut curr = MapEntry {
        start,
        ..MapEntry::default()
    };
    while curr.start + curr.length < end {
        let offset = curr.start + curr.length;
        let mut next = chain_status(node, offset, end - offset).map_err(|e| {
            ImgError::Msg(format!(
                "Could not read file metadata: {}",
                metadata_error(&e)
            ))
        })?;
        if curr.mergeable(&next) {
            curr.length += next.length;
            continue;
        }
        if curr.length > 0 {
            dump_entry(out, &curr, Some(&mut next), json)?;
        }
        curr = next;
    }
    dump_entry(out, &curr, None, json)?;
    if json {
        out.write_all(b"]\n").map_err(write_error)?;
    }
    Ok(())
}

/// Prints one entry (qemu-img's `dump_map_entry`); `next` is the entry after
/// it, which the text form may relabel so that more entries merge.
fn dump_entry(
    out: &mut impl Write,
    e: &MapEntry,
    next: Option<&mut MapEntry>,
    json: bool,
) -> Result<()> {
    if json {
        write!(
            out,
            "{{ \"start\": {}, \"length\": {}, \"depth\": {}, \"present\": {}, \"zero\": {}, \"data\": {}, \"compressed\": {}",
            e.start, e.length, e.depth, e.present, e.zero, e.data, e.compressed
        )
        .map_err(write_error)?;
        if let Some(o) = e.offset {
            write!(out, ", \"offset\": {o}").map_err(write_error)?;
        }
        out.write_all(b"}").map_err(write_error)?;
        if next.is_some() {
            out.write_all(b",\n").map_err(write_error)?;
        }
        return Ok(());
    }
    if e.data && e.offset.is_none() {
        return Err(ImgError::Msg(
            "File contains external, encrypted or compressed clusters.".into(),
        ));
    }
    if e.data && !e.zero {
        writeln!(
            out,
            "{:<16}{:<16}{:<16}{}",
            hex(e.start),
            hex(e.length),
            hex(e.offset.unwrap_or(0)),
            e.filename.as_deref().unwrap_or("")
        )
        .map_err(write_error)?;
    }
    // The text form does not tell zeros from unallocated bytes: one kind for both.
    if let Some(n) = next {
        if !n.data || n.zero {
            n.data = false;
            n.zero = true;
        }
    }
    Ok(())
}

/// C's `%#x`: `0x`-prefixed lower-case hex, but a bare `0` for zero.
fn hex(v: u64) -> String {
    if v == 0 {
        "0".into()
    } else {
        format!("{v:#x}")
    }
}

/// The status of the bytes from `offset` (at most `len`) through the backing
/// chain (qemu-img's `get_block_status`): the first layer that defines them,
/// with its depth.
fn chain_status(top: &NodeRef, offset: u64, len: u64) -> Result<MapEntry, BlockError> {
    let mut node = top.clone();
    let mut len = len;
    let mut depth = 0;
    let status = loop {
        let st = node.block_status(offset, len)?;
        len = st.len.clamp(1, len);
        if st.data || st.zero {
            break st;
        }
        match backing_of(&node) {
            Some(b) if offset < b.size() => {
                len = len.min(b.size() - offset);
                node = b;
                depth += 1;
            }
            // Nothing below defines these bytes.
            _ => {
                break BlockStatus {
                    allocated: false,
                    host: None,
                    ..BlockStatus::unallocated(len)
                }
            }
        }
    };
    let (offset_in_file, filename) = match status.host {
        Some(h) => (Some(h.offset), Some(h.file)),
        None => (None, None),
    };
    Ok(MapEntry {
        start: offset,
        length: len,
        depth,
        present: status.allocated,
        zero: status.zero,
        data: status.data,
        compressed: status.compressed,
        offset: offset_in_file,
        filename,
    })
}

/// The backing node of `node`, if it has one.
fn backing_of(node: &NodeRef) -> Option<NodeRef> {
    node.children()
        .into_iter()
        .find(|(role, _)| *role == "backing")
        .map(|(_, n)| n)
}

/// The cause of a failed status query, in strerror's words when it is an OS error.
fn metadata_error(e: &BlockError) -> String {
    let text = e.to_string();
    match text.rfind(" (os error ") {
        Some(at) => text[..at].to_string(),
        None => text,
    }
}

fn write_error(e: std::io::Error) -> ImgError {
    ImgError::Msg(format!("error writing the map: {e}"))
}

/// Why a size argument was refused (the errors of QEMU's `qemu_strtosz`).
#[derive(Debug, PartialEq, Eq)]
enum SizeError {
    /// Not a number.
    Invalid,
    /// Negative or too large.
    Range,
}

/// qemu-img's `cvtnum`: a size argument between 0 and `INT64_MAX`.
fn cvtnum(name: &str, value: &str) -> Result<u64> {
    match strtosz(value) {
        Ok(v) if v <= MAX_ARG => Ok(v),
        Err(SizeError::Invalid) => Err(ImgError::Msg(format!(
            "Invalid {name} specified: '{value}'."
        ))),
        _ => Err(ImgError::Msg(format!(
            "Invalid {name} specified. Must be between 0 and {MAX_ARG}."
        ))),
    }
}

/// QEMU's `qemu_strtosz`: decimal bytes (a fraction allowed with a unit) or
/// `0x` hex bytes, with an optional `B`, `K`, `M`, `G`, `T`, `P` or `E` suffix
/// (binary units; case-insensitive).
fn strtosz(text: &str) -> Result<u64, SizeError> {
    let t = text.trim_start();
    if let Some(rest) = t.strip_prefix('-') {
        let digits = rest.trim_start_matches('.');
        return Err(match digits.starts_with(|c: char| c.is_ascii_digit()) {
            true => SizeError::Range,
            false => SizeError::Invalid,
        });
    }
    if let Some(hex) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SizeError::Invalid);
        }
        return u64::from_str_radix(hex, 16).map_err(|_| SizeError::Range);
    }
    let (number, mul) = match t.char_indices().last() {
        Some((i, c)) => match suffix_mul(c) {
            Some(m) => (&t[..i], m),
            None => (t, 1),
        },
        None => return Err(SizeError::Invalid),
    };
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (int.is_empty() && frac.is_empty()) || !digits(int) || !digits(frac) {
        return Err(SizeError::Invalid);
    }
    let whole: u64 = match int {
        "" => 0,
        _ => int.parse().map_err(|_| SizeError::Range)?,
    };
    let fraction: f64 = format!("0.{frac}0").parse().unwrap_or(0.0);
    if mul == 1 && fraction != 0.0 {
        return Err(SizeError::Invalid);
    }
    let extra = (fraction * mul as f64) as u64;
    whole
        .checked_mul(mul)
        .and_then(|v| v.checked_add(extra))
        .ok_or(SizeError::Range)
}

/// The multiplier of a size suffix.
fn suffix_mul(c: char) -> Option<u64> {
    let shift = match c.to_ascii_uppercase() {
        'B' => 0,
        'K' => 10,
        'M' => 20,
        'G' => 30,
        'T' => 40,
        'P' => 50,
        'E' => 60,
        _ => return None,
    };
    Some(1 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_qemu_strtosz() {
        assert_eq!(strtosz("1.5k"), Ok(1536));
        assert_eq!(strtosz("0x10"), Ok(16));
        assert_eq!(strtosz("512b"), Ok(512));
        assert_eq!(strtosz("7E"), Ok(7 << 60));
        assert_eq!(strtosz("64"), Ok(64));
        assert_eq!(strtosz("-1"), Err(SizeError::Range));
        assert_eq!(strtosz("99999999999999999999"), Err(SizeError::Range));
        assert_eq!(strtosz("16E"), Err(SizeError::Range));
        assert_eq!(strtosz(""), Err(SizeError::Invalid));
        assert_eq!(strtosz("12x"), Err(SizeError::Invalid));
        assert_eq!(strtosz("1.5"), Err(SizeError::Invalid));
        assert!(cvtnum("start offset", "8E").is_err());
    }

    #[test]
    fn entries_merge_as_qemu_img() {
        let a = MapEntry {
            start: 0,
            length: 512,
            present: true,
            data: true,
            offset: Some(4096),
            filename: Some("f".into()),
            ..MapEntry::default()
        };
        let mut b = MapEntry {
            start: 512,
            offset: Some(4608),
            ..a.clone()
        };
        assert!(a.mergeable(&b));
        b.offset = Some(8192);
        assert!(!a.mergeable(&b));
        let empty = MapEntry::default();
        assert!(!empty.mergeable(&a));
        assert_eq!(hex(0), "0");
        assert_eq!(hex(0x10000), "0x10000");
    }
}
