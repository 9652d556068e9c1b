//! One module per subcommand: argument parsing and printing; the work itself lives
//! in the stage crates.

pub mod bench;
pub mod demo;
pub mod evaluate;
pub mod export;
pub mod extract;
pub mod index;
pub mod search;
pub mod selftest;
pub mod synth;
pub mod train;
