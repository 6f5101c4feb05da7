//! TODO
use anyhow::{Result, bail};

use crate::report::Section;

#[derive(clap::Args)]
pub struct Args {}

pub fn run(_args: &Args) -> Result<Section> {
    bail!("not written yet")
}
