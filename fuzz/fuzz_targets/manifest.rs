//! The manifest loader and validator, through the entry a git revision goes through
//! (`source::apply::parse_revision`): multi-document YAML of any shape, in one or two files (the
//! input is split at its first NUL byte) so that duplicate names across files are checked too.
#![no_main]

use controller::api::HostPolicy;
use controller::source::apply::parse_revision;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (first, second) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], Some(&data[at + 1..])),
        None => (data, None),
    };
    let (Ok(first), Ok(second)) = (std::str::from_utf8(first), second.map(std::str::from_utf8).transpose()) else {
        return;
    };
    let mut files = vec![("fleet/a.yaml", first)];
    if let Some(second) = second {
        files.push(("fleet/b.yaml", second));
    }
    match parse_revision("0123abc", files, &HostPolicy::default()) {
        Ok(docs) => {
            for (_, vm) in &docs {
                // What the store and the API do with an accepted VM next.
                let json = serde_json::to_string(vm).unwrap();
                let _: controller::api::Vm = serde_json::from_str(&json).unwrap();
            }
        }
        Err(err) => {
            // Rendering the report is what the user sees: it must not panic either.
            let _ = err.to_string();
        }
    }
});
