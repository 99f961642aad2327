/* A persistent pool of worker threads for the kernels of this directory (see pool.c). */
#ifndef PIE_TRIO_POOL_H
#define PIE_TRIO_POOL_H

#include <stdint.h>

/* A share of one job: part `index` of `parts`. */
typedef void (*pool_task)(void *context, int index, int parts);

/* Run `task` in `parts` parts (fewer when the pool cannot have that many threads; the task
 * is told how many), this thread taking part 0, and return when all are done. Runs every part
 * here, in turn, when `parts` is 1 or another caller holds the pool. */
void pool_run(pool_task task, void *context, int parts);

/* Idle workers sleep now instead of spinning for the next job: the caller knows none comes
 * soon (a model process between two requests), and their spinning would take the cores from
 * the threads that make the next one. The next `pool_run` wakes them. */
void pool_rest(void);

/* The first and one-past-last of `total` items that part `index` of `parts` takes. */
static inline void pool_share(int64_t total, int index, int parts, int64_t *first,
                              int64_t *last) {
    *first = total * index / parts;
    *last = total * (index + 1) / parts;
}

#endif
