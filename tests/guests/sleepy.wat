;; Blocks in a host call for ten minutes ({"op": "sleep", "ms": 600000}): for kills that must
;; interrupt a blocked call.
(module
  (import "pie" "call" (func $call (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 1024) "\82\a2op\a5sleep\a2ms\ce\00\09\27\c0")  ;; 18 bytes
  (func (export "_start")
    (drop (call $call (i32.const 1024) (i32.const 18) (i32.const 2048) (i32.const 1024)))))
