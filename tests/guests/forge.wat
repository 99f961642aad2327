;; Frees a page it never allocated. The answer must be an error ({"error": ...}); the guest then
;; "panics" like a Rust inferlet unwrapping it (a message on stderr, then `unreachable`).
;; If the forged free were accepted the guest exits with code 3 instead.
(module
  (import "pie" "call" (func $call (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $proc_exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 1024) "\82\a2op\aafree_pages\a5pages\91\cd\10\92")  ;; 25 bytes: pages [4242]
  (data (i32.const 1100) "\81\a5error")                                   ;; 7 bytes
  (data (i32.const 1200) "panicked: forged page id refused\n")            ;; 33 bytes
  (func (export "_start")
    (local $n i32)
    (local.set $n (call $call (i32.const 1024) (i32.const 25) (i32.const 4096) (i32.const 4096)))
    (if (i32.or (i32.lt_u (local.get $n) (i32.const 8))
                (i32.or (i32.ne (i32.load (i32.const 4096)) (i32.load (i32.const 1100)))
                        (i32.ne (i32.load16_u (i32.const 4100)) (i32.load16_u (i32.const 1104)))))
      (then (call $proc_exit (i32.const 3))))
    (i32.store (i32.const 64) (i32.const 1200))
    (i32.store (i32.const 68) (i32.const 33))
    (drop (call $fd_write (i32.const 2) (i32.const 64) (i32.const 1) (i32.const 72)))
    unreachable))
