;; gossip N: subscribes to topic "t", then broadcasts N messages of 1 MiB to it and never reads
;; them (its own subscription buffers them). Exits with the number of deliveries the broadcasts
;; reported, so a test can tell how many the host agreed to hold.
(module
  (import "pie" "call" (func $call (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 20)
  (data (i32.const 4096) "\82\a2op\a9subscribe\a5topic\a1t")                ;; 22 bytes
  (data (i32.const 8192) "\83\a2op\a9broadcast\a5topic\a1t\a7message\db\00\10\00\00")  ;; 35 bytes

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
    (local $left i32) (local $delivered i32)
    (local.set $left (call $arg (i32.const 1) (i32.const 1)))
    (drop (call $call (i32.const 4096) (i32.const 22) (i32.const 6144) (i32.const 64)))
    (memory.fill (i32.const 8227) (i32.const 0x78) (i32.const 1048576))  ;; 1 MiB of "x"
    (block $done
      (loop $again
        (br_if $done (i32.eqz (local.get $left)))
        ;; the answer is {"ok": count}: "\81\a2ok" then a positive fixint
        (drop (call $call (i32.const 8192) (i32.const 1048611) (i32.const 6144) (i32.const 64)))
        (local.set $delivered (i32.add (local.get $delivered) (i32.load8_u (i32.const 6148))))
        (local.set $left (i32.sub (local.get $left) (i32.const 1)))
        (br $again)))
    (call $proc_exit (local.get $delivered)))
)
