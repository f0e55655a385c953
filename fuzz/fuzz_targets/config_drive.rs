//! The config-drive codec as the guest init reads it: any drive contents are decoded, and whatever
//! decodes must encode to a drive that decodes to the same configuration.
#![no_main]

use guest_api::config::{encode, read_config_drive};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(config) = read_config_drive(data) {
        let again = read_config_drive(&encode(&config)[..]).expect("an encoded drive decodes");
        assert_eq!(again, config);
    }
});
