;; Takes a handle it never submitted: ABI misuse, the instance is trapped.
(module
  (import "pie" "take" (func $take (param i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (func (export "_start")
    (drop (call $take (i32.const 77) (i32.const 0) (i32.const 1024)))))
