;; ping N [Q]: N round trips of {"op": "ping", "payload": 1} through `call`, checking each answer;
;; with Q = 1 the request names queue 0 ({"op": "ping", "payload": 1, "queue": 0}), so it waits in
;; line on the trio thread instead of being answered on the guest's thread.
;; Exit 0 when every answer was {"ok": 1}; trap otherwise. The benchmark's per-call guest.
(module
  (import "pie" "call" (func $call (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 8192) "\82\a2op\a4ping\a7payload\01")   ;; 18 bytes
  (data (i32.const 8224) "\83\a2op\a4ping\a7payload\01\a5queue\00")  ;; 25 bytes
  (data (i32.const 8256) "\81\a2ok\01")                      ;; the expected answer, 5 bytes

  ;; argv[index] as a decimal number, or `default` when absent.
  (func $arg (param $index i32) (param $default i32) (result i32)
    (local $p i32) (local $n i32) (local $c i32)
    (drop (call $args_sizes_get (i32.const 0) (i32.const 4)))
    (if (i32.ge_u (local.get $index) (i32.load (i32.const 0)))
      (then (return (local.get $default))))
    (drop (call $args_get (i32.const 1024) (i32.const 2048)))
    (local.set $p (i32.load (i32.add (i32.const 1024) (i32.shl (local.get $index) (i32.const 2)))))
    (block $done
      (loop $digit
        (local.set $c (i32.load8_u (local.get $p)))
        (br_if $done (i32.lt_u (local.get $c) (i32.const 48)))
        (br_if $done (i32.gt_u (local.get $c) (i32.const 57)))
        (local.set $n (i32.add (i32.mul (local.get $n) (i32.const 10))
                               (i32.sub (local.get $c) (i32.const 48))))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (br $digit)))
    (local.get $n))

  (func (export "_start")
    (local $left i32) (local $request i32) (local $length i32)
    (local.set $left (call $arg (i32.const 1) (i32.const 1)))
    (local.set $request (i32.const 8192))
    (local.set $length (i32.const 18))
    (if (call $arg (i32.const 2) (i32.const 0))
      (then (local.set $request (i32.const 8224)) (local.set $length (i32.const 25))))
    (block $done
      (loop $again
        (br_if $done (i32.eqz (local.get $left)))
        (if (i32.ne (call $call (local.get $request) (local.get $length) (i32.const 16384) (i32.const 4096))
                    (i32.const 5))
          (then unreachable))
        (if (i32.ne (i32.load (i32.const 16384)) (i32.load (i32.const 8256)))
          (then unreachable))
        (if (i32.ne (i32.load8_u (i32.const 16388)) (i32.load8_u (i32.const 8260)))
          (then unreachable))
        (local.set $left (i32.sub (local.get $left) (i32.const 1)))
        (br $again))))
)
