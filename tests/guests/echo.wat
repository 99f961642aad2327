;; Echoes client messages (up to 128 KiB): each `receive`d string is `send` back, until the message "quit",
;; which sets the return value "done" and ends the program.
(module
  (import "pie" "call" (func $call (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 6)
  (data (i32.const 1024) "\81\a2op\a7receive")                    ;; 12 bytes
  (data (i32.const 1100) "\81\a2ok\a4quit")                       ;; 9 bytes
  (data (i32.const 1200) "\82\a2op\aaset_return\a5value\a4done")  ;; 26 bytes
  ;; {"op": "send", "message": <the received string>}: a 17-byte prefix, then the string
  ;; copied from the response (which is {"ok": <string>}: a 4-byte prefix, then the string).
  (data (i32.const 196608) "\82\a2op\a4send\a7message")
  (func (export "_start")
    (local $n i32)
    (loop $next
      (local.set $n (call $call (i32.const 1024) (i32.const 12) (i32.const 32768) (i32.const 131072)))
      (if (i32.gt_u (local.get $n) (i32.const 131072)) (then unreachable))
      (if (i32.and (i32.eq (local.get $n) (i32.const 9))
                   (i32.and (i64.eq (i64.load (i32.const 32768)) (i64.load (i32.const 1100)))
                            (i32.eq (i32.load8_u (i32.const 32776)) (i32.load8_u (i32.const 1108)))))
        (then
          (drop (call $call (i32.const 1200) (i32.const 26) (i32.const 2048) (i32.const 1024)))
          (return)))
      (memory.copy (i32.const 196625) (i32.const 32772) (i32.sub (local.get $n) (i32.const 4)))
      (drop (call $call (i32.const 196608) (i32.add (i32.const 13) (local.get $n))
                  (i32.const 2048) (i32.const 1024)))
      (br $next))))
