//! Unit tests of the LUKS2 reader.
