;; discard: submits a 4,000,000-byte ping on queue 0 (answered by the control layer, so the host
;; holds a 4 MB answer for it) and discards the handle, 100 times: every other time at once
;; (the answer not in yet, most likely), otherwise after waiting for it. Then it takes the last
;; handle it discarded, which is ABI misuse. Were a discarded request or its answer still held,
;; the outstanding-bytes limit (64 MiB) would end it at about the 16th. Exits 2 if a discard
;; is refused.
(module
  (import "pie" "call" (func $call (param i32 i32 i32 i32) (result i32)))
  (import "pie" "submit" (func $submit (param i32 i32) (result i32)))
  (import "pie" "wait" (func $wait (param i32 i32 i32) (result i32)))
  (import "pie" "take" (func $take (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 80)
  ;; {"op": "discard", "handle": <uint32, big-endian at 1044>}: 24 bytes
  (data (i32.const 1024) "\82\a2op\a7discard\a6handle\ce")
  ;; {"op": "ping", "queue": 0, "payload": <bin32 of 4,000,000 bytes>}: 29 bytes, then the payload
  (data (i32.const 4096) "\83\a2op\a4ping\a5queue\00\a7payload\c6\00\3d\09\00")

  (func (export "_start")
    (local $i i32) (local $h i32)
    (memory.fill (i32.const 4125) (i32.const 0x78) (i32.const 4000000))
    (loop $round
      (local.set $h (call $submit (i32.const 4096) (i32.const 4000029)))
      (if (i32.and (local.get $i) (i32.const 1))
        (then
          (i32.store (i32.const 512) (local.get $h))
          (drop (call $wait (i32.const 512) (i32.const 1) (i32.const 1)))))
      (i32.store8 (i32.const 1044) (i32.shr_u (local.get $h) (i32.const 24)))
      (i32.store8 (i32.const 1045) (i32.shr_u (local.get $h) (i32.const 16)))
      (i32.store8 (i32.const 1046) (i32.shr_u (local.get $h) (i32.const 8)))
      (i32.store8 (i32.const 1047) (local.get $h))
      ;; {"ok": nil} is 5 bytes; an error is longer
      (if (i32.ne (call $call (i32.const 1024) (i32.const 24) (i32.const 2048) (i32.const 64))
                  (i32.const 5))
        (then (call $proc_exit (i32.const 2))))
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $round (i32.lt_u (local.get $i) (i32.const 100))))
    (drop (call $take (local.get $h) (i32.const 2048) (i32.const 64))))
)
