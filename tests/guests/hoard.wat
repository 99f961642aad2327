;; hoard MODE: makes the host hold memory for it, from 5 MiB of linear memory.
;;   0  submits the same 4,000,000-byte request ({"op": "ping", "payload": <bin>}, whose answer
;;      echoes the payload) over and over and never takes an answer
;;   1  `call`s once with 1 MB of msgpack that decodes to 1,000,000 empty lists
;; Must end with limit outstanding (0) or message_size (1), never by exhausting the host.
(module
  (import "pie" "call" (func $call (param i32 i32 i32 i32) (result i32)))
  (import "pie" "submit" (func $submit (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_sizes_get" (func $args_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "args_get" (func $args_get (param i32 i32) (result i32)))
  (memory (export "memory") 80)
  (data (i32.const 4096) "\82\a2op\a4ping\a7payload")   ;; 17 bytes, the payload follows

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

  ;; At 4113: a one-byte msgpack type, a 4-byte big-endian length, then `count` bytes of `fill`.
  (func $payload (param $type i32) (param $count i32) (param $fill i32)
    (i32.store8 (i32.const 4113) (local.get $type))
    (i32.store8 (i32.const 4114) (i32.shr_u (local.get $count) (i32.const 24)))
    (i32.store8 (i32.const 4115) (i32.shr_u (local.get $count) (i32.const 16)))
    (i32.store8 (i32.const 4116) (i32.shr_u (local.get $count) (i32.const 8)))
    (i32.store8 (i32.const 4117) (local.get $count))
    (memory.fill (i32.const 4118) (local.get $fill) (local.get $count)))

  (func (export "_start")
    (if (i32.eqz (call $arg (i32.const 1) (i32.const 0)))
      (then
        (call $payload (i32.const 0xc6) (i32.const 4000000) (i32.const 0x78))  ;; bin32
        (loop $forever
          (drop (call $submit (i32.const 4096) (i32.const 4000022)))
          (br $forever)))
      (else
        (call $payload (i32.const 0xdd) (i32.const 1000000) (i32.const 0x90))  ;; array32 of []
        (drop (call $call (i32.const 4096) (i32.const 1000022) (i32.const 0) (i32.const 0))))))
)
