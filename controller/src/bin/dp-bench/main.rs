#![allow(dead_code)]
mod loadgen;
fn main() {}
