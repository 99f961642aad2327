;; For lifecycle tests: allocates argv[1] KV pages (default 1), then behaves as argv[2] says:
;;   0 exit normally   1 trap   2 block in `receive` (until killed or sent a message)
;;   3 spin            4 submit pings without ever taking them   5 exit with code 7
;; It never frees its pages: the runtime must.
(module
  (import "pie" "call" (func $call (param i32 i32 i32 i32) (result i32)))
  (import "pie" "submit" (func $submit (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 8192) "\82\a2op\aballoc_pages\a5count\00")   ;; 23 bytes, count patched at 8214
  (data (i32.const 8256) "\81\a2op\a7receive")                   ;; 12 bytes
  (data (i32.const 8320) "\82\a2op\a4ping\a7payload\01")         ;; 18 bytes
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
    (local $mode i32)
    ;; count < 128 is a positive fixint: one byte
    (i32.store8 (i32.const 8214) (call $arg (i32.const 1) (i32.const 1)))
    (drop (call $call (i32.const 8192) (i32.const 23) (i32.const 16384) (i32.const 4096)))
    (local.set $mode (call $arg (i32.const 2) (i32.const 0)))
    (if (i32.eq (local.get $mode) (i32.const 1)) (then unreachable))
    (if (i32.eq (local.get $mode) (i32.const 2))
      (then (drop (call $call (i32.const 8256) (i32.const 12) (i32.const 16384) (i32.const 4096)))))
    (if (i32.eq (local.get $mode) (i32.const 3)) (then (loop $spin (br $spin))))
    (if (i32.eq (local.get $mode) (i32.const 4))
      (then (loop $flood (drop (call $submit (i32.const 8320) (i32.const 18))) (br $flood))))
    (if (i32.eq (local.get $mode) (i32.const 5)) (then (call $proc_exit (i32.const 7))))))
