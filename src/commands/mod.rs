//! One module per subcommand: argument parsing and printing; the work itself lives
//! in the stage crates.

pub mod evaluate;
pub mod index;
pub mod synth;
