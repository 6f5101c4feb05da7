//! The collector's config file: parsing and validation never panic, and what `print-config`
//! writes of a valid config reads back as the same config.
#![no_main]
use std::path::Path;

use libfuzzer_sys::fuzz_target;
use outflow_collector::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(cfg) = Config::parse(Path::new("fuzz.toml"), text) else {
        return;
    };
    if cfg.validate().is_err() {
        return;
    }
    let printed = cfg.to_toml();
    let again = Config::parse(Path::new("printed.toml"), &printed).expect("what it printed parses");
    assert_eq!(again, cfg, "{printed}");
});
