#[path = "../tests/support/mod.rs"]
mod support;
fn main() {
    println!("{}", support::AGENT);
}
