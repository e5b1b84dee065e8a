//! The QMP JSON streamer (`vmm/src/qmp/lexer.rs`, with the parser behind it) fed
//! arbitrary bytes. It must not panic, and what it makes of a stream must not depend
//! on how the stream is cut into reads: the input fed whole and fed in pieces of the
//! size its first byte gives yield the same messages and errors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vmm::qmp::fuzzing::stream;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, bytes)) = data.split_first() else {
        return;
    };
    let whole = stream(&[bytes]);
    let pieces: Vec<&[u8]> = bytes.chunks(usize::from(cut).max(1)).collect();
    let cut_up = stream(&pieces);
    assert_eq!(whole, cut_up, "messages depend on where the stream is cut");
});
