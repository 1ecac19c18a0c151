//! One UDP datagram: parse, every header access and rewrite the proxy makes, round trips.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lb_proxy_fuzz_checks::datagram(data));
