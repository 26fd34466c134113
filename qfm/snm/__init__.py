"""SNM: the feature bank (faiss index over teacher embeddings) and noise-partner mining."""

from qfm.snm.bank import Bank, index_and_mine, load_bank, load_pairs, partners_by_anchor, save_bank
from qfm.snm.index import IndexInfo, build_index, configure_faiss, exact_search, measure_recall, search
from qfm.snm.mining import PAIR_COLUMNS, RULES, mine_partners, summarize_pairs

__all__ = [
    "PAIR_COLUMNS",
    "RULES",
    "Bank",
    "IndexInfo",
    "build_index",
    "configure_faiss",
    "exact_search",
    "index_and_mine",
    "load_bank",
    "load_pairs",
    "measure_recall",
    "mine_partners",
    "partners_by_anchor",
    "save_bank",
    "search",
    "summarize_pairs",
]
