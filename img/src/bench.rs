//! `cryptvm img bench`: qemu-img bench's workload (fixed-size requests at a
//! moving offset, `depth` in flight) on any node stack, including `json:`
//! names and `--object`, which qemu-img bench lacks.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use block::options::parse_size;

use super::image::{image_options, load_objects, open, OpenMode};
use super::{Args, ImgError, Result};

/// Runs `img bench`.
pub fn run(argv: &[String]) -> Result<u8> {
    let a = Args::parse(argv, "qnwU", "fcdosStTi")?;
    let [spec] = a.positional.as_slice() else {
        return Err(ImgError::Msg("Expecting one image file name".into()));
    };
    let mut count: u64 = 75000;
    let mut depth: u64 = 64;
    let mut bufsize: u64 = 4096;
    let mut offset: u64 = 0;
    let mut step: Option<u64> = None;
    for (opt, v) in &a.short {
        let num = || {
            parse_size(v).ok_or_else(|| ImgError::Msg(format!("Invalid value for -{opt}: '{v}'")))
        };
        match opt {
            'c' => count = num()?,
            'd' => depth = num()?,
            's' => bufsize = num()?,
            'o' => offset = num()?,
            'S' => step = Some(num()?),
            'i' if !["threads", "native", "io_uring"].contains(&v.as_str()) => {
                return Err(ImgError::Msg(format!("Invalid aio option: {v}")));
            }
            _ => {}
        }
    }
    // -o is the start offset here (Args files it with the creation options).
    if let Some(v) = a.options.last() {
        offset = parse_size(v)
            .ok_or_else(|| ImgError::Msg(format!("Invalid offset specified: '{v}'")))?;
    }
    let write = a.short_flags.contains(&'w');
    let mut pattern = 0u8;
    let mut flush_interval = 0u64;
    for (k, v) in &a.extra {
        match k.as_str() {
            "pattern" => {
                pattern = parse_byte(v).ok_or_else(|| {
                    ImgError::Msg(format!("Invalid pattern byte specified: '{v}'"))
                })?;
            }
            _ => {
                flush_interval = parse_size(v).ok_or_else(|| {
                    ImgError::Msg(format!("Invalid flush interval specified: '{v}'"))
                })?
            }
        }
    }
    if depth == 0 || depth > 4096 {
        return Err(ImgError::Msg(
            "Invalid queue depth specified (1..4096)".into(),
        ));
    }
    if bufsize == 0 || bufsize > (1 << 30) {
        return Err(ImgError::Msg("Invalid buffer size specified".into()));
    }
    if flush_interval > 0 && !write {
        return Err(ImgError::Msg(
            "--flush-interval is only available in write tests".into(),
        ));
    }
    let step = step.unwrap_or(bufsize);
    let secrets = load_objects(&a.objects)?;
    let image = open(
        image_options(spec, a.image_opts, a.format.as_deref())?,
        &secrets,
        OpenMode {
            read_only: !write,
            no_io: false,
            cache: a.cache,
        },
    )
    .map_err(|e| e.opening(spec))?;
    let size = image.node.size();
    if bufsize > size {
        return Err(ImgError::Msg(format!(
            "buffer size {bufsize} is larger than the image ({size} bytes)"
        )));
    }
    // qemu-img 10 prints these two lines even with -q.
    {
        println!(
            "Sending {count} {} requests, {bufsize} bytes each, {depth} in parallel (starting at offset {offset}, step size {step})",
            if write { "write" } else { "read" }
        );
    }
    // Request i goes to offset + i * step, wrapping so that it fits the image.
    let span = size - bufsize + 1;
    let next = AtomicU64::new(0);
    let started = Instant::now();
    let workers = depth.min(std::thread::available_parallelism().map_or(4, |n| n.get() as u64 * 4));
    let node = &image.node;
    std::thread::scope(|s| -> Result<()> {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(|| -> block::Result<()> {
                    let mut buf = vec![pattern; bufsize as usize];
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            return Ok(());
                        }
                        let at = offset.wrapping_add(i.wrapping_mul(step)) % span;
                        if write {
                            node.write_at(at, &buf)?;
                            if flush_interval > 0 && (i + 1).is_multiple_of(flush_interval) {
                                node.flush()?;
                            }
                        } else {
                            node.read_at(at, &mut buf)?;
                        }
                    }
                })
            })
            .collect();
        for h in handles {
            h.join()
                .map_err(|_| ImgError::Msg("a benchmark thread failed".into()))??;
        }
        Ok(())
    })?;
    if write && flush_interval > 0 {
        node.flush()?;
    }
    {
        println!(
            "Run completed in {:.3} seconds.",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(0)
}

/// A byte as qemu-img reads it (strtol base 0: decimal, 0x hex or 0 octal).
fn parse_byte(v: &str) -> Option<u8> {
    let n = if let Some(hex) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(hex, 16).ok()?
    } else if v.len() > 1 && v.starts_with('0') {
        u64::from_str_radix(&v[1..], 8).ok()?
    } else {
        v.parse().ok()?
    };
    u8::try_from(n).ok()
}

#[cfg(test)]
mod tests {
    use super::parse_byte;

    #[test]
    fn pattern_bytes() {
        assert_eq!(parse_byte("0x5a"), Some(0x5a));
        assert_eq!(parse_byte("90"), Some(90));
        assert_eq!(parse_byte("010"), Some(8));
        assert_eq!(parse_byte("256"), None);
        assert_eq!(parse_byte("zz"), None);
    }
}
