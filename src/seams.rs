//! Seam traits.
