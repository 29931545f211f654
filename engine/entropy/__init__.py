"""Entropy coding: integer frequency tables and rANS streams (constriction's `AnsCoder` format)."""

from perco.engine.entropy.rans import decode_symbols, encode_symbols
from perco.engine.entropy.tables import PROB_BITS, caption_table, uniform_table

__all__ = ["PROB_BITS", "caption_table", "decode_symbols", "encode_symbols", "uniform_table"]
