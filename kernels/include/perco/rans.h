/* PerCo Engine CUDA entropy coding: batched rANS over many independent streams.
 *
 * Stream format: constriction's AnsCoder (64-bit state, 32-bit words, 24-bit probabilities),
 * bit-exact with the CPU coder (docs/entropy-coding.md). Every stream is a uint32 word array;
 * symbols are decoded in order; the encoder pushes words in the order constriction does.
 *
 * Conventions of every entry point:
 *  - all pointers are device pointers unless the name ends in _host;
 *  - work is enqueued on `stream` (0 = the legacy default stream); nothing synchronizes
 *    except the *_host helpers;
 *  - the size contract of every pointer is written next to it; N = num_streams,
 *    S = symbol_offsets[N] (total symbols), K = num_symbols, W = word_offsets[N];
 *  - per-stream problems are reported in `status`, never by a crash or an out-of-bounds access;
 *    work per stream is bounded by its symbol count.
 */
#ifndef PERCO_RANS_H
#define PERCO_RANS_H

#include <stddef.h>
#include <stdint.h>
#include <cuda_runtime.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PERCO_PROB_BITS 24

/* Per-stream decode status. */
typedef enum {
  PERCO_STREAM_OK = 0,
  PERCO_STREAM_CORRUPT = 1,   /* ends in a zero word, or words left over after the last symbol */
  PERCO_STREAM_TRUNCATED = 2, /* all words consumed but the coder state did not return to empty */
} perco_stream_status;

/* Call result. */
typedef enum {
  PERCO_OK = 0,
  PERCO_ERR_INVALID_ARGUMENT = 1, /* K outside 2..65536, null pointer where one is required, ... */
  PERCO_ERR_CUDA = 2,             /* a CUDA call failed; cudaGetLastError() tells which */
} perco_result;

typedef enum {
  PERCO_TABLE_UNIFORM = 0,    /* f[i] = floor(2^24/K), remainder on f[K-1]; `cdf` unused */
  PERCO_TABLE_STATIC = 1,     /* one table per stream: cdf row table_index[stream] (row 0 if NULL) */
  PERCO_TABLE_PER_SYMBOL = 2, /* one table per symbol: cdf row = the symbol's position in [0, S) */
} perco_table_kind;

/* A model. A cdf row has K + 1 entries: cdf[0] = 0, cdf[K] = 2^24, f[i] = cdf[i+1] - cdf[i] >= 1. */
typedef struct {
  perco_table_kind kind;
  uint32_t num_symbols;         /* K, 2..65536 */
  const uint32_t* cdf;          /* STATIC: [num_tables * (K+1)]; PER_SYMBOL: [S * (K+1)] */
  const uint32_t* table_index;  /* STATIC only: [N] row per stream, or NULL */
} perco_model;

/* Decode N streams.
 * words          [W]      concatenated streams; stream i is words[word_offsets[i] .. word_offsets[i+1])
 * word_offsets   [N + 1]  non-decreasing
 * symbol_offsets [N + 1]  non-decreasing; stream i yields symbols[symbol_offsets[i] .. symbol_offsets[i+1])
 * symbols        [S]      output, int32 in [0, K)
 * status         [N]      output, perco_stream_status
 * No scratch memory is needed. */
perco_result perco_rans_decode(perco_model model, const uint32_t* words, const uint64_t* word_offsets,
                               const uint64_t* symbol_offsets, uint32_t num_streams, int32_t* symbols,
                               int32_t* status, cudaStream_t stream);

/* Encode N streams.
 * symbols        [S]      input, each in [0, K) (an out-of-range symbol marks its stream CORRUPT)
 * symbol_offsets [N + 1]  as for decode
 * words          [S + 2N] output; stream i is written at words[symbol_offsets[i] + 2 i ...]
 *                          (capacity n_i + 2 words: one word per symbol at most, plus the state)
 * word_counts    [N]      output, words of stream i (trailing zero words trimmed, as constriction)
 * status         [N]      output, OK or CORRUPT
 * No scratch memory is needed: each stream's capacity region is its scratch. */
perco_result perco_rans_encode(perco_model model, const int32_t* symbols, const uint64_t* symbol_offsets,
                               uint32_t num_streams, uint32_t* words, uint32_t* word_counts, int32_t* status,
                               cudaStream_t stream);

/* Integer tables from model outputs, the procedure of docs/entropy-coding.md, bit-exact with numpy.
 * values   [rows * K] float32 logits (from_logits = 1) or probabilities (from_logits = 0), row-major
 * cdf      [rows * (K+1)] output
 * scratch  [rows * K] uint64 caller-provided scratch (the integer weights) */
perco_result perco_tables_from_values(const float* values, uint32_t rows, uint32_t num_symbols, int from_logits,
                                      uint32_t* cdf, uint64_t* scratch, cudaStream_t stream);

/* --- host helpers for bindings without a CUDA array library (ctypes) -----------------------
 * Same contracts, host pointers; they allocate, copy, run on a private stream and synchronize.
 * cdf_len / table_index_len are the element counts of model_host.cdf / .table_index. Checked on
 * the host first (PERCO_ERR_INVALID_ARGUMENT): offsets never decrease; PER_SYMBOL: cdf_len >=
 * S * (K+1) (S = 0 is valid: empty streams); STATIC: at least one row, and table_index, if given,
 * has N entries naming existing rows. */
int perco_cuda_device_count(void);
perco_result perco_rans_decode_host(perco_model model_host, size_t cdf_len, size_t table_index_len,
                                    const uint32_t* words_host, const uint64_t* word_offsets_host,
                                    const uint64_t* symbol_offsets_host, uint32_t num_streams,
                                    int32_t* symbols_host, int32_t* status_host);
perco_result perco_rans_encode_host(perco_model model_host, size_t cdf_len, size_t table_index_len,
                                    const int32_t* symbols_host, const uint64_t* symbol_offsets_host,
                                    uint32_t num_streams, uint32_t* words_host, uint32_t* word_counts_host,
                                    int32_t* status_host);

#ifdef __cplusplus
}
#endif
#endif /* PERCO_RANS_H */
