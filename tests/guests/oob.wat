;; Passes a request pointer beyond its memory: ABI misuse, the instance is trapped.
(module
  (import "pie" "call" (func $call (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (drop (call $call (i32.const 0x7fff0000) (i32.const 16) (i32.const 0) (i32.const 1024)))))
