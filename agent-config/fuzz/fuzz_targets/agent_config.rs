//! The agent's config file, as the agent reads it (`Config::load` is a file read, then
//! `Config::parse`; `validate` after the flags): parsing, validation and their error messages
//! never panic, and what `print-config` writes of a valid config reads back as the same config.
#![no_main]
use libfuzzer_sys::fuzz_target;
use outflow_agent_config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let cfg = match Config::parse(text) {
        Ok(cfg) => cfg,
        Err(message) => {
            assert!(!message.contains('\n'), "one line: {message}");
            return;
        }
    };
    if let Err(e) = cfg.validate() {
        let _ = e.to_string();
        return;
    }
    let printed = cfg.to_toml();
    let again = Config::parse(&printed).expect("what it printed parses");
    assert_eq!(again, cfg, "{printed}");
    again.validate().expect("what it printed is valid");
});
