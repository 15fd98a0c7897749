//! What the SIMD kernels share across instruction sets: a tile of weight rows held one row
//! per 32-bit lane ([`Lanes`], 16 lanes for AVX-512 and 8 for AVX2), the operations the
//! formats' decoders use on it, and the decoded [`Unit`] a format hands to the kernels.
//!
//! A lane value can only be made through an `Isa` token, which exists only where the CPU was
//! found to run the instructions; so the operations are safe to call, and a format's decoder
//! is ordinary generic code that compiles into each instruction set's kernels.

/// 32-bit lanes across the rows of a tile, lane `j` holding row `j`.
///
/// Byte operations (`sub8`, `lookup`, `eq8`) act on each byte on its own;
/// `shr16`/`shl16` shift 16-bit halves (callers mask the bits that cross a byte);
/// `lookup` indexes within each 128 bits, as `vpshufb` does.
pub(crate) trait Lanes: Copy {
    /// f32 lanes.
    type F: Floats;
    /// Proof that the CPU runs this set's instructions.
    type Isa: Copy;
    /// Lanes, so rows per tile.
    const L: usize;

    fn splat(isa: Self::Isa, v: u32) -> Self;
    /// The 16 bytes `b` in every 128 bits.
    fn bytes(isa: Self::Isa, b: [u8; 16]) -> Self;
    fn fsplat(isa: Self::Isa, v: f32) -> Self::F;
    fn and(self, o: Self) -> Self;
    fn or(self, o: Self) -> Self;
    fn sub8(self, o: Self) -> Self;
    fn add32(self, o: Self) -> Self;
    fn sub32(self, o: Self) -> Self;
    fn shr16(self, n: u32) -> Self;
    fn shl16(self, n: u32) -> Self;
    fn shr32(self, n: u32) -> Self;
    fn shl32(self, n: u32) -> Self;
    fn sar32(self, n: u32) -> Self;
    /// Byte `i` of the result is byte `idx[i] & 15` of `self`'s 128 bits holding byte `i`.
    fn lookup(self, idx: Self) -> Self;
    /// 0xFF in each byte equal in both, else 0.
    fn eq8(self, o: Self) -> Self;
    /// Each lane as a signed integer, converted.
    fn to_f32(self) -> Self::F;
    /// The low 16 bits of each lane as an f16, converted.
    fn f16_lo(self) -> Self::F;

    /// The 4 bytes at `base + offsets[j]` in lane `j`.
    ///
    /// # Safety
    /// Every `base + offsets[j]` must have 4 readable bytes.
    unsafe fn dword_at(isa: Self::Isa, base: *const u8, offsets: &[usize; 16]) -> Self;

    /// The 16 bytes at `base + offsets[j]` of every lane `j`, transposed: register `u` holds
    /// bytes `4u..4u + 4` of row `j` in lane `j`.
    ///
    /// # Safety
    /// Every `base + offsets[j]` must have 16 readable bytes.
    unsafe fn columns16(isa: Self::Isa, base: *const u8, offsets: &[usize; 16]) -> [Self; 4];

    /// Byte `i` (0..4) of each lane, sign-extended, as f32.
    #[inline(always)]
    fn byte_f32(self, i: u32) -> Self::F {
        self.shl32(24 - 8 * i).sar32(24).to_f32()
    }
}

/// f32 lanes (see [`Lanes`]).
pub(crate) trait Floats: Copy {
    fn add(self, o: Self) -> Self;
    fn mul(self, o: Self) -> Self;
    /// `self · a + b`, rounded once.
    fn fma(self, a: Self, b: Self) -> Self;
    fn neg(self) -> Self;
    /// The lanes, in order, into the first lanes of `out`.
    fn store(self, out: &mut [f32; 16]);
}

/// Weight rows of a tile at one block: lane `j` reads row `j` (lanes past the last row
/// repeat the first row; the kernels drop their results).
pub(crate) struct Tile<'a, V: Lanes> {
    isa: V::Isa,
    data: &'a [u8],
    offsets: [usize; 16],
    row_bytes: usize,
    at: usize,
    block_bytes: usize,
}

impl<'a, V: Lanes> Tile<'a, V> {
    /// The tile over `data` (`live` rows of `row_bytes`, at most [`Lanes::L`]), at its first
    /// block of `block_bytes`.
    ///
    /// # Panics
    /// If `data` is not `live` whole rows, a row is shorter than a block, or `live` is 0 or
    /// over [`Lanes::L`].
    #[inline(always)]
    pub fn new(isa: V::Isa, data: &'a [u8], live: usize, row_bytes: usize, block_bytes: usize) -> Self {
        assert!(live > 0 && live <= V::L && data.len() == live * row_bytes, "tile of {live} rows");
        assert!(block_bytes <= row_bytes, "{block_bytes}-byte blocks in a row of {row_bytes}");
        let offsets = std::array::from_fn(|j| if j < live { j * row_bytes } else { 0 });
        Tile { isa, data, offsets, row_bytes, at: 0, block_bytes }
    }

    /// Moves to the block starting `at` bytes into each row.
    ///
    /// # Panics
    /// If the block does not end inside the row.
    #[inline(always)]
    pub fn seek(&mut self, at: usize) {
        assert!(at + self.block_bytes <= self.row_bytes, "block at {at} in a row of {}", self.row_bytes);
        self.at = at;
    }

    pub fn isa(&self) -> V::Isa {
        self.isa
    }

    #[inline(always)]
    pub fn splat(&self, v: u32) -> V {
        V::splat(self.isa, v)
    }

    /// The u32 at byte `off` of every row's block.
    ///
    /// # Panics
    /// If the four bytes are not inside the block.
    #[inline(always)]
    pub fn dword(&self, off: usize) -> V {
        assert!(off + 4 <= self.block_bytes, "dword at {off} of a {}-byte block", self.block_bytes);
        // SAFETY: `new` made `offsets[j] + row_bytes <= data.len()` for every lane, `seek` keeps
        // `at + block_bytes <= row_bytes`, and the four bytes are inside the block.
        unsafe { V::dword_at(self.isa, self.data.as_ptr().add(self.at + off), &self.offsets) }
    }

    /// Bytes `off..off + 16` of every row's block, transposed (see [`Lanes::columns16`]).
    ///
    /// # Panics
    /// If the bytes are not inside the block.
    #[inline(always)]
    pub fn bytes16(&self, off: usize) -> [V; 4] {
        assert!(off + 16 <= self.block_bytes, "16 bytes at {off} of a {}-byte block", self.block_bytes);
        // SAFETY: as in `dword`, for the sixteen bytes.
        unsafe { V::columns16(self.isa, self.data.as_ptr().add(self.at + off), &self.offsets) }
    }

    /// Bytes `off..off + 32` of every row's block, transposed: register `u` holds bytes
    /// `4u..4u + 4`.
    #[inline(always)]
    pub fn bytes32(&self, off: usize) -> [V; 8] {
        let (a, b) = (self.bytes16(off), self.bytes16(off + 16));
        [a[0], a[1], a[2], a[3], b[0], b[1], b[2], b[3]]
    }

    /// Values 0..16 from the low nibbles of 16 bytes, then 16..32 from their high nibbles
    /// (ggml's packing of a 32-value block), as bytes.
    #[inline(always)]
    pub fn nibbles16(&self, raw: [V; 4]) -> [V; 8] {
        let m = self.splat(0x0F0F_0F0F);
        let mut out = [m; 8];
        for u in 0..4 {
            out[u] = raw[u].and(m);
            out[u + 4] = raw[u].shr16(4).and(m);
        }
        out
    }

    /// The low (`high == false`) or high nibble of each byte.
    #[inline(always)]
    pub fn nibbles(&self, raw: &[V; 8], high: bool) -> [V; 8] {
        let m = self.splat(0x0F0F_0F0F);
        let mut out = *raw;
        for v in &mut out {
            *v = if high { v.shr16(4).and(m) } else { v.and(m) };
        }
        out
    }

    /// Bits `from..from + width` of each byte, moved to bits `to..to + width`, the rest zero.
    #[inline(always)]
    pub fn field(&self, v: V, from: u32, width: u32, to: u32) -> V {
        let mask = ((1u32 << width) - 1) << to;
        let moved = if from >= to { v.shr16(from - to) } else { v.shl16(to - from) };
        moved.and(self.splat(mask * 0x0101_0101))
    }

    /// A 32-bit mask per row (`bits`) spread over the 32 values of a block: byte `i` of
    /// register `u` is `high` where bit `4u + i` is set, else 0 (Q5_0's and Q5_1's fifth bits).
    #[inline(always)]
    pub fn mask_bytes(&self, bits: V, high: u8) -> [V; 8] {
        let high = self.splat(u32::from(high) * 0x0101_0101);
        let mut out = [high; 8];
        for b in 0..4u8 {
            // Byte `b` of each lane's mask into all four bytes of the lane.
            let mut sel = [0u8; 16];
            for (i, s) in sel.iter_mut().enumerate() {
                *s = (i as u8 & !3) + b;
            }
            let spread = bits.lookup(V::bytes(self.isa, sel));
            for half in 0..2 {
                let bit = self.splat(0x0804_0201 << (4 * half));
                out[2 * usize::from(b) + half] = spread.and(bit).eq8(bit).and(high);
            }
        }
        out
    }

    /// 16 signed scale bytes per row given as four transposed registers: byte `k`, as f32.
    #[inline(always)]
    pub fn i8_at(&self, regs: &[V; 4], k: usize) -> V::F {
        regs[k / 4].byte_f32((k % 4) as u32)
    }

    /// Byte `k` (of the 16 in `regs`, transposed as by [`Tile::bytes16`]) of each row,
    /// shifted right by `shift`, in the low bits of each lane (higher bits of the byte stay).
    #[inline(always)]
    pub fn byte(&self, regs: &[V; 4], k: usize, shift: u32) -> V {
        regs[k / 4].shr32(8 * (k % 4) as u32 + shift)
    }
}

/// One decoded unit of a tile (see [`super::formats::Format::lanes`]): up to four 32-value
/// blocks as bytes (register `u` holds values `4u..4u + 4` of each row), with their scales
/// and offsets per half block.
pub(crate) struct Unit<V: Lanes> {
    pub q: [[V; 8]; 4],
    pub scale: [[V::F; 2]; 4],
    pub offset: [[V::F; 2]; 4],
}

impl<V: Lanes> Unit<V> {
    /// A unit of zeros.
    #[inline(always)]
    pub fn new(isa: V::Isa) -> Self {
        let (z, f) = (V::splat(isa, 0), V::fsplat(isa, 0.0));
        Unit { q: [[z; 8]; 4], scale: [[f; 2]; 4], offset: [[f; 2]; 4] }
    }

    /// Block `k`'s scale and offset for both halves (a format with one per 32 values).
    #[inline(always)]
    pub fn set32(&mut self, k: usize, scale: V::F, offset: V::F) {
        self.scale[k] = [scale; 2];
        self.offset[k] = [offset; 2];
    }
}

/// `vpdpbusd` for lanes `V`: `acc + Σ a·b` over each lane's four unsigned bytes of `a` and
/// signed bytes of `b`. A value of the implementing type proves the CPU runs it.
pub(crate) trait Dpbusd<V: Lanes>: Copy {
    fn dpbusd(self, acc: V, a: V, b: V) -> V;
}
