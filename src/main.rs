fn main() {
    println!("starling");
}
