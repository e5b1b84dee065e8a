//! Compression and decompression of compressed clusters: raw deflate
//! (QEMU's zlib type) and zstd. Decompressed output must fill exactly one
//! cluster; anything else means the cluster is corrupt.

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

/// Compresses one cluster as QEMU's `qcow2_co_compress` does: raw deflate
/// at zlib's default level, or a zstd frame. None when the result would be
/// longer than `max` bytes (QEMU passes `cluster_size - 1`, and then writes
/// the cluster uncompressed).
///
/// Deflate here (miniz_oxide) looks back 32 KiB where QEMU's zlib, with
/// window bits -12, looks back 4 KiB; QEMU inflates a cluster in one call,
/// for which any distance within the cluster is fine (and so does every
/// reader that inflates whole clusters). zstd is ruzstd's fastest level
/// (about zstd's level 1; QEMU uses libzstd's default, 3), which stores
/// some clusters raw that libzstd would shrink, such as noise followed by a
/// long run of one byte.
pub fn compress(kind: CompressionType, input: &[u8], max: usize) -> Option<Vec<u8>> {
    let out = match kind {
        CompressionType::Zlib => deflate(input, max)?,
        CompressionType::Zstd => {
            ruzstd::encoding::compress_to_vec(input, ruzstd::encoding::CompressionLevel::Fastest)
        }
    };
    (out.len() <= max).then_some(out)
}

/// Raw deflate into at most `max` bytes (None if it does not fit).
fn deflate(input: &[u8], max: usize) -> Option<Vec<u8>> {
    let mut c = flate2::Compress::new(flate2::Compression::default(), false);
    let mut out = Vec::with_capacity(max);
    match c.compress_vec(input, &mut out, flate2::FlushCompress::Finish) {
        Ok(flate2::Status::StreamEnd) => Some(out),
        _ => None,
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

    #[test]
    fn compress_round_trips_and_gives_up_on_noise() {
        let text: Vec<u8> = b"qcow2 compressed cluster "
            .iter()
            .cycle()
            .take(65536)
            .copied()
            .collect();
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let noise: Vec<u8> = (0..65536)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for kind in [CompressionType::Zlib, CompressionType::Zstd] {
            let c = compress(kind, &text, 65535).expect("text compresses");
            assert!(c.len() < 4096, "{kind:?}: {} bytes", c.len());
            let mut out = vec![0u8; 65536];
            decompress(kind, &c, &mut out).unwrap();
            assert_eq!(out, text, "{kind:?}");
            assert!(compress(kind, &noise, 65535).is_none(), "{kind:?}");
            // Too small a limit.
            assert!(compress(kind, &text, 8).is_none(), "{kind:?}");
        }
    }
}
