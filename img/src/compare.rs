//! `cryptvm img compare`: whether two images have the same content.

use block::NodeRef;

use super::image::{image_options, load_objects, open, OpenMode};
use super::{Args, ImgError, Result};

const CHUNK: usize = 1 << 20;

/// Runs `img compare`: exit 0 when identical, 1 when they differ.
pub fn run(argv: &[String]) -> Result<u8> {
    let a = Args::parse(argv, "qsUp", "fFT")?;
    let [first, second] = a.positional.as_slice() else {
        return Err(ImgError::Msg("Expecting two image file names".into()));
    };
    let secrets = load_objects(&a.objects)?;
    let mode = OpenMode {
        read_only: true,
        no_io: false,
        cache: a.src_cache,
    };
    let one = open(
        image_options(first, a.image_opts, a.format.as_deref())?,
        &secrets,
        mode,
    )
    .map_err(|e| e.opening(first))?;
    let two = open(
        image_options(second, a.image_opts, a.format2.as_deref())?,
        &secrets,
        mode,
    )
    .map_err(|e| e.opening(second))?;
    let (s1, s2) = (one.node.size(), two.node.size());
    if s1 != s2 && a.strict {
        println!("Strict mode: Image size mismatch!");
        return Ok(1);
    }
    let common = s1.min(s2);
    if let Some(at) = first_difference(&one.node, &two.node, common)? {
        println!("Content mismatch at offset {at}!");
        return Ok(1);
    }
    if s1 != s2 {
        if !a.quiet {
            println!("Warning: Image size mismatch!");
        }
        // As qemu-img: the longer image's tail must read as zeros.
        let longer = if s1 > s2 { &one.node } else { &two.node };
        if let Some(at) = first_nonzero(longer, common, s1.max(s2))? {
            println!("Content mismatch at offset {at}!");
            return Ok(1);
        }
    }
    println!("Images are identical.");
    Ok(0)
}

/// Offset of the first 512-byte sector whose bytes differ.
fn first_difference(a: &NodeRef, b: &NodeRef, size: u64) -> Result<Option<u64>> {
    let (mut ba, mut bb) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
    let mut off = 0;
    while off < size {
        let n = (size - off).min(CHUNK as u64) as usize;
        a.read_at(off, &mut ba[..n])?;
        b.read_at(off, &mut bb[..n])?;
        if let Some(i) = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y) {
            return Ok(Some(off + (i as u64 & !511)));
        }
        off += n as u64;
    }
    Ok(None)
}

/// Offset of the first non-zero byte in `[from, to)`.
fn first_nonzero(node: &NodeRef, from: u64, to: u64) -> Result<Option<u64>> {
    let mut buf = vec![0u8; CHUNK];
    let mut off = from;
    while off < to {
        let n = (to - off).min(CHUNK as u64) as usize;
        node.read_at(off, &mut buf[..n])?;
        if let Some(i) = buf[..n].iter().position(|&x| x != 0) {
            return Ok(Some(off + i as u64));
        }
        off += n as u64;
    }
    Ok(None)
}
