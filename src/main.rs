fn main() {
    println!("cormorant: under construction");
}
