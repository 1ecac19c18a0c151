//! A TCP byte stream cut into reads anywhere: framing, then each framed message as a datagram.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lb_proxy_fuzz_checks::stream(data));
