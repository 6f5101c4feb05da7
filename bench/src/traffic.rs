//! Per-packet cost under real traffic and throughput attached versus detached (iperf3 over veth).
use anyhow::{Result, bail};

use crate::report::Section;

#[derive(clap::Args)]
pub struct CostArgs {}

#[derive(clap::Args)]
pub struct ThroughputArgs {}

pub fn run_cost(_args: &CostArgs) -> Result<Section> {
    bail!("not written yet")
}

pub fn run_throughput(_args: &ThroughputArgs) -> Result<Section> {
    bail!("not written yet")
}
