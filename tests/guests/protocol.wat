;; Walks the whole ABI contract and exits with the number of the first check that failed
;; (0 when all passed). Run it with the arguments "a" "bc".
;;  2: submit returns distinct handles >= 1      7: take h1 / h3 give payloads 1 and 3
;;  3: wait(all) returns the count               8: call with a 1-byte buffer returns the size
;;  4: wait(any) returns a valid index           9: fetch with a 1-byte buffer keeps the response
;;  5: take with a small buffer writes nothing  10: fetch with room returns {"ok": ["a", "bc"]}
;;  6: take h2 returns {"ok": 2}                11: a submitted `version` can be waited and taken
(module
  (import "pie" "call" (func $call (param i32 i32 i32 i32) (result i32)))
  (import "pie" "submit" (func $submit (param i32 i32) (result i32)))
  (import "pie" "wait" (func $wait (param i32 i32 i32) (result i32)))
  (import "pie" "take" (func $take (param i32 i32 i32) (result i32)))
  (import "pie" "fetch" (func $fetch (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 1024) "\82\a2op\a4ping\a7payload\01")
  (data (i32.const 1056) "\82\a2op\a4ping\a7payload\02")
  (data (i32.const 1088) "\82\a2op\a4ping\a7payload\03")
  (data (i32.const 1120) "\81\a2op\a4args")                 ;; 9 bytes
  (data (i32.const 1152) "\81\a2op\a7version")              ;; 12 bytes
  (data (i32.const 1200) "\81\a2ok\01")
  (data (i32.const 1216) "\81\a2ok\02")
  (data (i32.const 1232) "\81\a2ok\03")
  (data (i32.const 1248) "\81\a2ok\92\a1a\a2bc")          ;; 10 bytes

  (func $check (param $ok i32) (param $code i32)
    (if (i32.eqz (local.get $ok)) (then (call $proc_exit (local.get $code)))))
  (func $same (param $a i32) (param $b i32) (param $len i32) (result i32)
    (block $differ
      (loop $byte
        (if (i32.eqz (local.get $len)) (then (return (i32.const 1))))
        (br_if $differ (i32.ne (i32.load8_u (local.get $a)) (i32.load8_u (local.get $b))))
        (local.set $a (i32.add (local.get $a) (i32.const 1)))
        (local.set $b (i32.add (local.get $b) (i32.const 1)))
        (local.set $len (i32.sub (local.get $len) (i32.const 1)))
        (br $byte)))
    (i32.const 0))

  (func (export "_start")
    (local $h1 i32) (local $h2 i32) (local $h3 i32) (local $i i32) (local $n i32) (local $h i32)
    (local.set $h1 (call $submit (i32.const 1024) (i32.const 18)))
    (local.set $h2 (call $submit (i32.const 1056) (i32.const 18)))
    (local.set $h3 (call $submit (i32.const 1088) (i32.const 18)))
    (call $check (i32.and (i32.ge_s (local.get $h1) (i32.const 1))
                          (i32.and (i32.ne (local.get $h1) (local.get $h2))
                                   (i32.and (i32.ne (local.get $h2) (local.get $h3))
                                            (i32.ne (local.get $h1) (local.get $h3)))))
                 (i32.const 2))
    (i32.store (i32.const 512) (local.get $h1))
    (i32.store (i32.const 516) (local.get $h2))
    (i32.store (i32.const 520) (local.get $h3))
    (call $check (i32.eq (call $wait (i32.const 512) (i32.const 3) (i32.const 1)) (i32.const 3))
                 (i32.const 3))
    (local.set $i (call $wait (i32.const 512) (i32.const 3) (i32.const 0)))
    (call $check (i32.lt_u (local.get $i) (i32.const 3)) (i32.const 4))
    ;; too small: the size comes back, nothing is written, the handle stays
    (call $check (i32.eq (call $take (local.get $h2) (i32.const 2048) (i32.const 2)) (i32.const 5))
                 (i32.const 5))
    (call $check (i32.eqz (i32.load8_u (i32.const 2048))) (i32.const 5))
    (call $check (i32.eq (call $take (local.get $h2) (i32.const 2048) (i32.const 1024)) (i32.const 5))
                 (i32.const 6))
    (call $check (call $same (i32.const 2048) (i32.const 1216) (i32.const 5)) (i32.const 6))
    (call $check (i32.eq (call $take (local.get $h1) (i32.const 2048) (i32.const 1024)) (i32.const 5))
                 (i32.const 7))
    (call $check (call $same (i32.const 2048) (i32.const 1200) (i32.const 5)) (i32.const 7))
    (call $check (i32.eq (call $take (local.get $h3) (i32.const 2048) (i32.const 1024)) (i32.const 5))
                 (i32.const 7))
    (call $check (call $same (i32.const 2048) (i32.const 1232) (i32.const 5)) (i32.const 7))
    ;; call + fetch
    (local.set $n (call $call (i32.const 1120) (i32.const 9) (i32.const 3000) (i32.const 1)))
    (call $check (i32.eq (local.get $n) (i32.const 10)) (i32.const 8))
    (call $check (i32.eqz (i32.load8_u (i32.const 3000))) (i32.const 8))
    (call $check (i32.eq (call $fetch (i32.const 3000) (i32.const 1)) (i32.const 10)) (i32.const 9))
    (call $check (i32.eqz (i32.load8_u (i32.const 3000))) (i32.const 9))
    (call $check (i32.eq (call $fetch (i32.const 3000) (i32.const 1024)) (i32.const 10)) (i32.const 10))
    (call $check (call $same (i32.const 3000) (i32.const 1248) (i32.const 10)) (i32.const 10))
    ;; a request the runtime answers locally, through submit/wait/take
    (local.set $h (call $submit (i32.const 1152) (i32.const 12)))
    (i32.store (i32.const 512) (local.get $h))
    (call $check (i32.eqz (call $wait (i32.const 512) (i32.const 1) (i32.const 0))) (i32.const 11))
    (call $check (i32.gt_u (call $take (local.get $h) (i32.const 4000) (i32.const 1024)) (i32.const 4))
                 (i32.const 11))
    (call $check (call $same (i32.const 4000) (i32.const 1200) (i32.const 4)) (i32.const 11))))
