//! Entry points for fuzzing: each takes arbitrary bytes and runs one parser of untrusted input
//! the way loading or a request runs it. They return nothing; a panic, an abort or a hang is the
//! finding. Used by the `fuzz/` targets and the corpus replay test.
