//! Decompression of compressed clusters: raw deflate (QEMU's zlib type)
//! and zstd. The output must fill exactly one cluster; anything else means
//! the cluster is corrupt.

use std::io::Read;

use super::header::CompressionType;

/// Largest zstd window accepted (bounds the decoder's memory).
const MAX_ZSTD_WINDOW: u64 = 8 << 20;

/// Decompresses `input` into `out` (one cluster). Trailing input bytes
/// (sector padding, the next cluster's data) are ignored.
pub fn decompress(kind: CompressionType, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        CompressionType::Zlib => inflate(input, out),
        CompressionType::Zstd => unzstd(input, out),
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut d = flate2::Decompress::new(false);
    let status = d
        .decompress(input, out, flate2::FlushDecompress::Finish)
        .map_err(|e| format!("deflate: {e}"))?;
    let produced = d.total_out() as usize;
    match status {
        _ if produced == out.len() => Ok(()),
        flate2::Status::StreamEnd => Err(format!(
            "deflate stream ended after {produced} of {} bytes",
            out.len()
        )),
        _ => Err(format!(
            "deflate data is truncated ({produced} of {} bytes)",
            out.len()
        )),
    }
}

fn unzstd(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut src = input;
    let mut dec =
        ruzstd::decoding::StreamingDecoder::new_with_max_window_size(&mut src, MAX_ZSTD_WINDOW)
            .map_err(|e| format!("zstd: {e}"))?;
    let mut done = 0;
    while done < out.len() {
        match dec.read(&mut out[done..]) {
            Ok(0) => {
                return Err(format!(
                    "zstd data ended after {done} of {} bytes",
                    out.len()
                ))
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(format!("zstd: {e}")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn deflate_round_trip_and_garbage() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        enc.write_all(&data).unwrap();
        let mut c = enc.finish().unwrap();
        c.extend_from_slice(&[0xaa; 100]); // trailing bytes are ignored
        let mut out = vec![0u8; 4096];
        decompress(CompressionType::Zlib, &c, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress(CompressionType::Zlib, &[0xff; 64], &mut out).is_err());
        assert!(decompress(CompressionType::Zlib, &c[..10], &mut out).is_err());
        let mut big = vec![0u8; 8192];
        assert!(decompress(CompressionType::Zlib, &c, &mut big).is_err());
        assert!(decompress(CompressionType::Zstd, &[0xff; 64], &mut out).is_err());
        assert!(decompress(CompressionType::Zstd, &[], &mut out).is_err());
    }
}
