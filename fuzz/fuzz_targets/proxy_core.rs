//! The sans-IO proxy core driven by a script of messages, answers, errors and clock steps.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| lb_proxy_fuzz_checks::core(data));
