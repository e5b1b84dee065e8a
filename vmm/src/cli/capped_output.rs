//! The serial console's file, with a size limit (`serial-max-size`): a guest that
//! writes without end must not fill the host's disk. Output past the limit is dropped,
//! and said so once, in the file and on stderr.

use std::io::{self, Write};

/// `inner`, taking at most `max` bytes (0: no limit); see the module documentation.
pub struct CappedOutput<W: Write> {
    inner: W,
    max: u64,
    written: u64,
    stopped: bool,
}

impl<W: Write> CappedOutput<W> {
    /// Writes to `inner`, at most `max` bytes of guest output (0: no limit).
    pub fn new(inner: W, max: u64) -> Self {
        Self {
            inner,
            max,
            written: 0,
            stopped: false,
        }
    }
}

impl<W: Write> Write for CappedOutput<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.max == 0 {
            return self.inner.write(buf);
        }
        let room = self.max - self.written;
        if room > 0 {
            let take = buf.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            let n = self.inner.write(&buf[..take])?;
            self.written += n as u64;
            return Ok(n);
        }
        if !self.stopped {
            self.stopped = true;
            let note = format!(
                "\n[cryptvm: guest output stopped here: serial-max-size is {} bytes]\n",
                self.max
            );
            self.inner.write_all(note.as_bytes())?;
            self.inner.flush()?;
            eprintln!(
                "cryptvm: the guest wrote {} bytes to its serial console file, the \
                 serial-max-size limit; further output is dropped",
                self.max
            );
        }
        // Dropped, as a full console would lose it; the guest is not told.
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn output_past_the_limit_is_dropped_and_announced_once() {
        let mut out = CappedOutput::new(Vec::new(), 10);
        out.write_all(b"0123456").unwrap();
        out.write_all(b"789abc").unwrap();
        out.write_all(b"more").unwrap();
        let text = String::from_utf8(out.inner.clone()).unwrap();
        assert!(
            text.starts_with("0123456789\n[cryptvm: guest output stopped"),
            "{text}"
        );
        assert_eq!(text.matches("stopped").count(), 1, "{text}");
        assert!(!text.contains("abc") && !text.contains("more"), "{text}");
    }

    #[test]
    fn zero_means_no_limit() {
        let mut out = CappedOutput::new(Vec::new(), 0);
        out.write_all(&[7u8; 100_000]).unwrap();
        assert_eq!(out.inner.len(), 100_000);
    }
}
