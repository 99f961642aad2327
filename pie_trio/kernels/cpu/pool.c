/* Worker threads that spin between jobs, then sleep.
 *
 * A decode step runs about 150 short parallel jobs (a projection, an attention) a few
 * microseconds apart. torch's OpenMP threads wait passively (pie_trio/__init__.py sets
 * OMP_WAIT_POLICY=PASSIVE: spinning ones took the CPU from guest threads between forwards), and
 * OpenMP keeps one team per calling thread, so every parallel region woke its workers with a
 * futex; a batch-1 forward measured ~28 ms on the executor's thread against ~17 ms on the main
 * one. These workers spin on a generation counter for a while after each job (SPIN_NS), so the
 * next job of the same step finds them awake, and sleep on a futex after that, so an idle
 * server (or torch's threads, between our calls) loses nothing to them; `pool_rest` sends them
 * to sleep at once where the caller knows no job comes soon. One caller holds the
 * pool at a time; another runs its job alone on its own thread rather than wait.
 */
#define _GNU_SOURCE
#include "pool.h"

#include <immintrin.h>
#include <limits.h>
#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define MAX_WORKERS 63
/* How long an idle worker keeps spinning: longer than the gaps between the jobs of one
 * decode_layers call (microseconds), shorter than the gaps between steps, where spinning
 * workers would take cores from torch's own threads (a batch of 32 runs oneDNN between our
 * attention calls, and its threads then waited on the descheduled ones). */
#define SPIN_NS 100000

static struct {
    pthread_mutex_t owner; /* held by the caller whose job runs (and who starts workers) */
    int workers;
    _Atomic uint32_t generation; /* bumped per job: the workers' wake-up word */
    _Atomic int sleepers;
    _Atomic int pending; /* workers yet to finish with the current job */
    _Atomic uint32_t rest; /* a generation after which idle workers sleep at once (pool_rest) */
    pool_task task;
    void *context;
    int parts;
} pool = {.owner = PTHREAD_MUTEX_INITIALIZER};

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

static void futex(_Atomic uint32_t *word, int op, uint32_t value) {
    syscall(SYS_futex, (uint32_t *)word, op | FUTEX_PRIVATE_FLAG, value, NULL, NULL, 0);
}

/* Wait until the generation moves past `seen`: spin, then sleep. */
static uint32_t next_job(uint32_t seen) {
    int64_t deadline = 0;
    for (unsigned spins = 0;; spins++) {
        const uint32_t generation = atomic_load_explicit(&pool.generation, memory_order_acquire);
        if (generation != seen) return generation;
        if ((spins & 1023) != 1023) {
            _mm_pause();
            continue;
        }
        const int64_t now = now_ns();
        if (deadline == 0) deadline = now + SPIN_NS;
        if (now < deadline && atomic_load_explicit(&pool.rest, memory_order_relaxed) != seen)
            continue;
        atomic_fetch_add(&pool.sleepers, 1);
        /* returns at once if a job was posted since the load above: no lost wake-up */
        futex(&pool.generation, FUTEX_WAIT, seen);
        atomic_fetch_sub(&pool.sleepers, 1);
        deadline = 0;
    }
}

/* The generation each worker was started at: a worker that first runs after the job it was
 * started for was posted still takes that job. */
static uint32_t started_at[MAX_WORKERS + 1];

static void *work(void *argument) {
    const int index = (int)(intptr_t)argument;
    uint32_t seen = started_at[index];
    for (;;) {
        seen = next_job(seen);
        /* every worker reports back, with a part or without one, so the caller never posts
         * the next job while a worker may still read this one */
        if (index < pool.parts) pool.task(pool.context, index, pool.parts);
        atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
    }
    return NULL;
}

/* Start workers up to `wanted`; returns how many run. Called by the pool's owner only. */
static int grow(int wanted) {
    if (wanted > MAX_WORKERS) wanted = MAX_WORKERS;
    while (pool.workers < wanted) {
        pthread_t thread;
        pthread_attr_t attributes;
        pthread_attr_init(&attributes);
        pthread_attr_setdetachstate(&attributes, PTHREAD_CREATE_DETACHED);
        started_at[pool.workers + 1] = atomic_load(&pool.generation);
        const int failed = pthread_create(&thread, &attributes, work,
                                          (void *)(intptr_t)(pool.workers + 1));
        pthread_attr_destroy(&attributes);
        if (failed) break;
        pool.workers++;
    }
    return pool.workers;
}

/* A forked child has none of the parent's workers: start from none. */
static void forget_workers(void) {
    pthread_mutex_t fresh = PTHREAD_MUTEX_INITIALIZER;
    pool.owner = fresh;
    pool.workers = 0;
    atomic_store(&pool.sleepers, 0);
}

__attribute__((constructor)) static void register_fork_handler(void) {
    pthread_atfork(NULL, NULL, forget_workers);
}

void pool_rest(void) {
    atomic_store_explicit(&pool.rest, atomic_load(&pool.generation), memory_order_relaxed);
}

static void run_alone(pool_task task, void *context, int parts) {
    for (int i = 0; i < parts; i++) task(context, i, parts);
}

void pool_run(pool_task task, void *context, int parts) {
    if (parts <= 1 || pthread_mutex_trylock(&pool.owner) != 0) {
        run_alone(task, context, parts);
        return;
    }
    /* past MAX_WORKERS, or where threads are refused: fewer, bigger parts */
    const int helpers = grow(parts - 1);
    if (helpers < parts - 1) parts = helpers + 1;
    if (parts == 1) {
        pthread_mutex_unlock(&pool.owner);
        run_alone(task, context, parts);
        return;
    }
    pool.task = task;
    pool.context = context;
    pool.parts = parts;
    atomic_store_explicit(&pool.pending, helpers, memory_order_relaxed);
    atomic_fetch_add_explicit(&pool.generation, 1, memory_order_release);
    if (atomic_load(&pool.sleepers) > 0) futex(&pool.generation, FUTEX_WAKE, INT_MAX);
    task(context, 0, parts);
    for (unsigned spins = 0; atomic_load_explicit(&pool.pending, memory_order_acquire) > 0;
         spins++) {
        if ((spins & 1023) == 1023)
            sched_yield(); /* a descheduled worker: let it have this core */
        else
            _mm_pause();
    }
    pthread_mutex_unlock(&pool.owner);
}
