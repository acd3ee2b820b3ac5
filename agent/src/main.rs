fn main() {
    println!("rollguard-agent: not yet built");
}
